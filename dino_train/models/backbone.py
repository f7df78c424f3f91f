"""Backbones from timm: the release's ViTs by their names, or any timm model by its name and kwargs.

timm's ViT already has the release's parameter names (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.N.attn.qkv``, ``norm``), returns the final-norm CLS token with ``num_classes=0``, and with
``dynamic_img_size=True`` one model takes global and local crops of any size the patch divides. Any other
timm model (``resnet50``, ``convnext_tiny``, ``xcit_small_12_p16_224``, ...) is built with
``num_classes=0`` so that its forward gives pooled (B, D) features, which is all DINO needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import timm
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dino_train.models.pos_embed import use_rule

# embed dim, depth, heads: the original release's vit_tiny / vit_small / vit_base.
ARCH_DIMS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
}
RELEASE_ARCHS = tuple(ARCH_DIMS)
_VIT_MODULES = ["vision_transformer", "deit"]  # timm modules whose models are VisionTransformers


class NotAViTError(TypeError):
    """A ViT-only feature (attention maps, patch grids, per-block options) asked of another backbone."""


@dataclass(frozen=True)
class BackboneSpec:
    """What builds a backbone: a timm model name and its keyword arguments. Checkpoints record it, so
    evaluation rebuilds exactly the model that was trained."""

    timm_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    pos_embed: str = "release"  # how a ViT resizes its position grid (dino_train.models.pos_embed)
    # The per-band {"mean": [...], "std": [...]} a multi-band backbone was trained on (data.band_stats):
    # its inputs' normalisation, which evaluation must repeat; None for RGB with ImageNet's.
    input_stats: dict[str, list[float]] | None = None

    def as_dict(self) -> dict[str, Any]:
        record = {"timm_name": self.timm_name, "kwargs": dict(self.kwargs), "pos_embed": self.pos_embed}
        if self.input_stats is not None:
            record["input_stats"] = {k: list(v) for k, v in self.input_stats.items()}
        return record


def is_known_arch(arch: str) -> bool:
    return arch in ARCH_DIMS or timm.is_model(arch)


def is_vit_name(timm_name: str) -> bool:
    return timm.models.is_model_in_modules(timm_name, _VIT_MODULES)


def backbone_spec(
    arch: str,
    patch_size: int = 16,
    img_size: int = 224,
    timm_kwargs: dict[str, Any] | None = None,
    pos_embed: str = "release",
) -> BackboneSpec:
    """The timm name and kwargs for ``arch``: a release name (with ``patch_size``) or a timm name.
    ``img_size`` sets a ViT's position grid (img_size / patch per side); other input sizes interpolate it
    by the ``pos_embed`` rule."""
    extra = dict(timm_kwargs or {})
    if arch in ARCH_DIMS:
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        kwargs = {"patch_size": patch_size, "img_size": img_size, **extra}
        return BackboneSpec(f"{arch}_patch16_224", kwargs, pos_embed)
    if not timm.is_model(arch):
        raise ValueError(f"unknown arch {arch!r}: not one of {', '.join(ARCH_DIMS)} nor a timm model name")
    if is_vit_name(arch):
        extra = {"img_size": img_size, **extra}
    return BackboneSpec(arch, extra, pos_embed)


def build_from_spec(spec: BackboneSpec, drop_path_rate: float = 0.0) -> nn.Module:
    """The backbone without classifier, whose forward returns (B, D) features. Drop path (student only)
    rises linearly over depth up to ``drop_path_rate``; nothing is downloaded."""
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0, **spec.kwargs}
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if is_vit_name(spec.timm_name):
        kwargs.setdefault("dynamic_img_size", True)
    model = use_rule(timm.create_model(spec.timm_name, **kwargs), spec.pos_embed)
    if isinstance(model, VisionTransformer) and spec.timm_name.endswith("_patch16_224"):
        # The release initialises the class token like the position embedding (timm uses std 1e-6).
        nn.init.trunc_normal_(model.cls_token, std=0.02)
    return model


def build_backbone(
    arch: str,
    patch_size: int = 16,
    img_size: int = 224,
    drop_path_rate: float = 0.0,
    timm_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """``build_from_spec(backbone_spec(...))``: a release ViT by name, or any timm model."""
    return build_from_spec(backbone_spec(arch, patch_size, img_size, timm_kwargs), drop_path_rate)


def as_vit(model: nn.Module, feature: str) -> VisionTransformer:
    """The timm ViT inside ``model`` (through DDP's ``.module`` and the wrapper's ``.backbone``), or a
    NotAViTError saying that ``feature`` needs a ViT."""
    seen = model
    while not isinstance(seen, VisionTransformer):
        inner = getattr(seen, "module", None) or getattr(seen, "backbone", None)
        if not isinstance(inner, nn.Module):
            name = type(model).__name__
            raise NotAViTError(f"{feature}: {name} is not a ViT, and this needs a ViT backbone")
        seen = inner
    return seen


def embed_dim(backbone: nn.Module) -> int:
    return int(backbone.num_features)


def patch_size_of(backbone: nn.Module) -> int:
    return int(as_vit(backbone, "a patch size").patch_embed.patch_size[0])


def check_crop_size(backbone: nn.Module, size: int, key: str) -> None:
    """A ViT takes crops its patch divides; other backbones take any size."""
    if isinstance(backbone, VisionTransformer) and size % patch_size_of(backbone):
        raise ValueError(
            f"{key}: {size} is not a multiple of the backbone's patch size {patch_size_of(backbone)}"
        )
