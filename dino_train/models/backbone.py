"""Vision Transformer backbones from timm, with the original DINO release's weight names.

timm's ViT already has the release's parameter names (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.N.attn.qkv``, ``norm``), returns the final-norm CLS token with ``num_classes=0``, and with
``dynamic_img_size=True`` one model takes global and local crops of any size the patch divides.
"""

from __future__ import annotations

import timm
from torch import nn

# embed dim, depth, heads: the original release's vit_tiny / vit_small / vit_base.
ARCH_DIMS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
}


def build_backbone(
    arch: str, patch_size: int = 16, img_size: int = 224, drop_path_rate: float = 0.0
) -> nn.Module:
    """A ViT without classifier whose forward returns the normed CLS token, shape (B, embed_dim).

    ``img_size`` sets the position-embedding grid (img_size / patch_size per side); other input sizes
    are handled by interpolating it. Drop path rises linearly over depth up to ``drop_path_rate``.
    """
    if arch not in ARCH_DIMS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCH_DIMS)}")
    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    model = timm.create_model(
        f"{arch}_patch16_224",
        pretrained=False,
        num_classes=0,
        patch_size=patch_size,
        img_size=img_size,
        drop_path_rate=drop_path_rate,
        dynamic_img_size=True,
    )
    # The release initialises the class token like the position embedding (timm uses std 1e-6).
    nn.init.trunc_normal_(model.cls_token, std=0.02)
    return model


def embed_dim(backbone: nn.Module) -> int:
    return int(backbone.num_features)


def patch_size_of(backbone: nn.Module) -> int:
    return int(backbone.patch_embed.patch_size[0])
