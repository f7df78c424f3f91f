"""Which backbone a state dict belongs to, read from its keys and shapes: the release's ViTs (any depth,
patch, position grid, registers), its ResNets and XCiTs. Our checkpoints record the timm name and kwargs
(``checkpoint["backbone"]``) and need none of this; so does the ``<file>.json`` sidecar training writes next
to ``teacher_backbone.pth`` (a plain state dict in the release's layout, which cannot hold the record, and
whose non-ViT backbones the weights alone do not name). Other backbone-only files and the release's files
are read from their weights."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch

from dino_train.models.backbone import ARCH_DIMS, BackboneSpec, backbone_spec
from dino_train.runtime.files import CheckpointError

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_LAYER = re.compile(r"^layer(\d)\.(\d+)\.")
_XCIT_SIZES = {128: "nano", 192: "tiny", 384: "small", 512: "medium", 768: "large"}
# ResNet blocks per stage -> name, for basic (2-conv) and bottleneck (3-conv) blocks.
_RESNETS = {
    (False, (2, 2, 2, 2)): "resnet18",
    (False, (3, 4, 6, 3)): "resnet34",
    (True, (3, 4, 6, 3)): "resnet50",
    (True, (3, 4, 23, 3)): "resnet101",
    (True, (3, 8, 36, 3)): "resnet152",
}
Weights = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Inferred:
    """A backbone read from weights: how to build it, and its shape for the user."""

    spec: BackboneSpec
    family: str  # "vit", "resnet", "xcit" or "recorded"
    arch: str  # release name (vit_small) or timm name
    depth: int
    patch_size: int | None = None
    img_size: int | None = None  # pixels covered by a ViT's position grid
    embed_dim: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        if self.family != "vit":
            return f"{self.arch} ({self.depth} blocks)" if self.depth else self.arch
        grid = (self.img_size or 0) // (self.patch_size or 1)
        return (
            f"{self.arch}/{self.patch_size} (embed dim {self.embed_dim}, {self.depth} blocks, "
            f"{self.patch_size}x{self.patch_size} patches, {grid}x{grid} position grid = {self.img_size} px)"
        )


def _count(sd: Weights, pattern: re.Pattern) -> int:
    return 1 + max((int(m.group(1)) for k in sd if (m := pattern.match(k))), default=-1)


def infer_vit(sd: Weights, path: Path | str) -> Inferred:
    """A release-style ViT: arch from the width, depth from the blocks, patch and grid from the shapes."""
    dim = int(sd["cls_token"].shape[-1])
    depth = _count(sd, _BLOCK)
    patch = int(sd["patch_embed.proj.weight"].shape[-1])
    registers = int(sd["reg_token"].shape[1]) if "reg_token" in sd else 0
    n = int(sd["pos_embed"].shape[1])
    # timm's ViT (as the release's) has positions for the prefix tokens (CLS, registers) first; dinov2's
    # register models have positions for the patches only (no_embed_class).
    patches = n - 1 - registers
    no_embed_class = math.isqrt(patches) ** 2 != patches
    patches = n if no_embed_class else patches
    grid = math.isqrt(patches)
    if grid * grid != patches:
        raise CheckpointError(f"{path}: pos_embed has {n} positions, not a square grid (plus prefix tokens)")
    arch = next((a for a, (d, _, _) in ARCH_DIMS.items() if d == dim), None)
    if arch is None:
        known = ", ".join(f"{a} ({d})" for a, (d, _, _) in ARCH_DIMS.items())
        raise CheckpointError(f"{path}: ViT embed dim {dim} matches no known arch ({known}); pass --arch")
    kwargs: dict[str, Any] = {}
    if depth != ARCH_DIMS[arch][1]:
        kwargs["depth"] = depth
    if registers:
        kwargs["reg_tokens"] = registers
    if no_embed_class:
        kwargs["no_embed_class"] = True
    chans = int(sd["patch_embed.proj.weight"].shape[1])
    if chans != 3:  # a multi-band backbone (data.channels)
        kwargs["in_chans"] = chans
    if "blocks.0.ls1.gamma" in sd:  # layer scale (dinov2); the value is the file's
        kwargs["init_values"] = 1e-5
    spec = backbone_spec(arch, patch, grid * patch, kwargs)
    return Inferred(spec, "vit", arch, depth, patch, grid * patch, dim, kwargs)


def infer_resnet(sd: Weights) -> Inferred | None:
    stages = tuple(_count({k: v for k, v in sd.items() if k.startswith(f"layer{i}.")},
                          re.compile(rf"^layer{i}\.(\d+)\.")) for i in range(1, 5))  # fmt: skip
    name = _RESNETS.get(("layer1.0.conv3.weight" in sd, stages))
    if name is None:
        return None
    chans = int(sd["conv1.weight"].shape[1])
    kwargs = {"in_chans": chans} if chans != 3 else {}  # a multi-band backbone (data.channels)
    return Inferred(BackboneSpec(name, kwargs), "resnet", name, sum(stages), extra=kwargs)


def infer_xcit(sd: Weights) -> Inferred | None:
    dim = int(sd["cls_token"].shape[-1])
    convs = sum(1 for k in sd if re.match(r"^patch_embed\.proj\.\d+\.0\.weight$", k))
    patch = 2**convs
    name = f"xcit_{_XCIT_SIZES.get(dim, '?')}_{_count(sd, _BLOCK)}_p{patch}_224"
    if not timm.is_model(name):
        return None
    return Inferred(BackboneSpec(name), "xcit", name, _count(sd, _BLOCK), patch)


def infer_backbone(sd: Weights, path: Path | str) -> Inferred:
    """The backbone these (prefix-free) weights fit, or a CheckpointError saying how to name it."""
    if any(k.startswith("cls_attn_blocks.") for k in sd) and "cls_token" in sd:
        found = infer_xcit(sd)
    elif all(k in sd for k in ("cls_token", "pos_embed", "patch_embed.proj.weight")):
        return infer_vit(sd, path)
    elif "conv1.weight" in sd and "layer1.0.conv1.weight" in sd:
        found = infer_resnet(sd)
    else:
        found = None
    if found is None:
        shown = ", ".join(list(sd)[:8]) + (", ..." if len(sd) > 8 else "")
        raise CheckpointError(
            f"{path}: cannot tell which backbone these weights are (keys: {shown}). Pass --arch with the "
            "timm model name; a linear classifier or head file is not a backbone."
        )
    return found


def from_recorded(recorded: Any) -> Inferred | None:
    """The backbone our checkpoints record (``{"timm_name", "kwargs"}``), or None."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("timm_name"), str):
        return None
    stats = recorded.get("input_stats")
    spec = BackboneSpec(
        recorded["timm_name"],
        dict(recorded.get("kwargs") or {}),
        recorded.get("pos_embed", "release"),
        stats if isinstance(stats, dict) else None,
    )
    patch, img = spec.kwargs.get("patch_size"), spec.kwargs.get("img_size")
    return Inferred(spec, "recorded", spec.timm_name, 0, patch, img)


SPEC_SIDECAR_SUFFIX = ".json"


def spec_sidecar_path(path: str | Path) -> Path:
    """``<file>.json``: the backbone record written beside a backbone-only weights file."""
    path = Path(path)
    return path.with_name(path.name + SPEC_SIDECAR_SUFFIX)


def spec_sidecar_text(recorded: dict[str, Any]) -> str:
    """The sidecar's contents for a ``BackboneSpec.as_dict()`` record: ``{"backbone": {...}}``."""
    return json.dumps({"backbone": recorded}, indent=2, sort_keys=True) + "\n"


def read_spec_sidecar(path: str | Path) -> Inferred | None:
    """The backbone recorded in ``<path>.json``, or None when there is no such file; a sidecar that is
    not JSON or holds no ``backbone`` record is an error naming it (a wrong guess would be worse)."""
    side = spec_sidecar_path(path)
    if not side.is_file():
        return None
    try:
        data = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(
            f"{side}: not a readable JSON backbone record ({err}); fix or delete it"
        ) from err
    found = from_recorded(data.get("backbone") if isinstance(data, dict) else None)
    if found is None:
        raise CheckpointError(
            f'{side}: no backbone record (expected {{"backbone": {{"timm_name": ..., "kwargs": {{...}}}}}}); '
            "fix or delete it"
        )
    return found
