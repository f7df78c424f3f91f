"""The fine-tuned network and how its parameters are optimised: a pretrained backbone with a linear
classifier on its features, stochastic depth, and AdamW parameter groups with layer-wise lr decay.

Layer-wise decay (BEiT, MAE; the usual way to fine-tune a ViT): the classifier and the final norm learn at
the base lr, block i of a depth-L ViT at ``decay ** (L - i)`` times it, and the patch embedding, class
token and position embedding at ``decay ** (L + 1)``, so the early layers, whose features transfer best,
move least. A backbone that is not a ViT has no blocks to count: every layer gets the base lr.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from timm.layers import DropPath
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from eval.linear.model import new_linear

# Parameters of a ViT that sit before the first block (layer 0 of the decay) and take no weight decay.
_EMBEDDINGS = ("cls_token", "reg_token", "dist_token", "pos_embed", "patch_embed.", "mask_token")
_NO_DECAY_NAMES = ("cls_token", "reg_token", "dist_token", "pos_embed", "mask_token")


class FineTuneModel(nn.Module):
    """``backbone`` (images (B, 3, H, W) -> features (B, D)) followed by a linear classifier (D -> C).

    The classifier starts as the linear probe's does (weights N(0, 0.01), bias 0): small logits at first,
    so the early, large gradients do not wreck the pretrained features. State dict keys are
    ``backbone.*`` and ``head.*``, which ``dino_train.models.loading`` reads back as a backbone."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = new_linear(int(backbone.num_features), num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def set_drop_path(backbone: nn.Module, rate: float) -> bool:
    """Stochastic depth rising linearly over a ViT's blocks from 0 to ``rate`` (timm's and the release's
    rule), set in place on a loaded model. Returns False, changing nothing, for a backbone that is not a
    ViT (timm builds their drop path at construction only)."""
    if not isinstance(backbone, VisionTransformer):
        return False
    depth = len(backbone.blocks)
    for i, block in enumerate(backbone.blocks):
        p = rate * i / max(depth - 1, 1)
        block.drop_path1 = DropPath(p) if p > 0 else nn.Identity()
        block.drop_path2 = DropPath(p) if p > 0 else nn.Identity()
    return True


def layer_index(name: str, depth: int) -> int:
    """A backbone parameter's layer for the decay: 0 before the blocks, i + 1 in block i, depth + 1 after
    (the final norm; the classifier is outside the backbone and also gets depth + 1)."""
    if name.startswith(_EMBEDDINGS):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def _takes_decay(name: str, param: nn.Parameter) -> bool:
    # Biases, norm scales and the learnt tokens are not shrunk (BEiT, MAE, DeiT all exempt them).
    return param.ndim > 1 and not name.split(".")[-1].startswith(_NO_DECAY_NAMES)


@dataclass(frozen=True)
class DecayPlan:
    """How the lr is spread over the layers, recorded with the results."""

    layer_decay: float
    per_block: bool  # False: not a ViT, every layer at the base lr
    depth: int

    def describe(self) -> str:
        if not self.per_block:
            return "uniform (not a ViT: every layer at the base lr)"
        lowest = self.layer_decay ** (self.depth + 1)
        return f"per block, {self.layer_decay:g} per layer (embeddings at {lowest:.3g}x the base lr)"


def param_groups(
    model: FineTuneModel, weight_decay: float, layer_decay: float
) -> tuple[list[dict[str, Any]], DecayPlan]:
    """AdamW parameter groups of ``model``: one per (layer, decayed or not), each with ``lr_scale`` (the
    factor on the scheduled lr) and its ``weight_decay``. Frozen parameters are left out."""
    vit = isinstance(model.backbone, VisionTransformer)
    depth = len(model.backbone.blocks) if vit else 0
    plan = DecayPlan(layer_decay, vit, depth)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    named = [(f"backbone.{n}", n, p) for n, p in model.backbone.named_parameters()]
    named += [(f"head.{n}", "head", p) for n, p in model.head.named_parameters()]
    for full, name, param in named:
        if not param.requires_grad:
            continue
        layer = layer_index(name, depth) if vit else 0
        decay = _takes_decay(name, param)
        scale = layer_decay ** (depth + 1 - layer) if vit else 1.0
        group = groups.setdefault(
            (layer, decay),
            {"params": [], "names": [], "lr_scale": scale, "weight_decay": weight_decay if decay else 0.0},
        )
        group["params"].append(param)
        group["names"].append(full)
    return [groups[k] for k in sorted(groups)], plan
