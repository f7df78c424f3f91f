"""The fine-tuned network and how its parameters are optimised: a pretrained backbone with a linear
classifier on its features, stochastic depth, and AdamW parameter groups with layer-wise lr decay.

Layer-wise decay (BEiT, MAE; the usual way to fine-tune a ViT): the classifier and the final norm learn at
the base lr, block i of a depth-L ViT at ``decay ** (L - i)`` times it, and the patch embedding, class
token and position embedding at ``decay ** (L + 1)``, so the early layers, whose features transfer best,
move least. A backbone that is not a ViT has no blocks to count: every layer gets the base lr. timm's
``param_groups_layer_decay`` makes the groups; its ViT ``group_matcher`` says which parameters are the
embeddings (the class and register tokens, the position embedding, the patch embedding, a pre-norm).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from timm.layers import DropPath
from timm.models import group_parameters
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

from eval.linear.model import new_linear

# Learnt tokens that take no weight decay (matched on a parameter name's last part, as they always were).
_NO_DECAY_NAMES = ("cls_token", "reg_token", "dist_token", "pos_embed", "mask_token")


# Parameters of a ViT that sit before the first block (layer 0 of the decay).
_EMBEDDINGS = ("cls_token", "reg_token", "dist_token", "pos_embed", r"patch_embed\.", "mask_token")


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

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """The layers of the decay, in timm's form (``timm.optim.param_groups_layer_decay`` reads it): a
        ViT's embeddings first, then one layer per block, then everything left (the final norm, any
        pooling, and the classifier) as the top layer. timm's ViT matcher instead joins the final norm to
        the last block, so that block learns at the base lr and the embeddings at ``decay ** L``; BEiT and
        MAE (and fine-tuning here from the start) give the norm and the classifier a layer of their own.
        A backbone that is not a ViT is one layer: every parameter is unmatched, and timm puts unmatched
        parameters in the top layer."""
        if not isinstance(self.backbone, VisionTransformer):
            return {}
        # The embeddings named here, not the backbone's own matcher's stem: that one also names norm_pre
        # (pre-norm ViTs), which fine-tuning has always trained at the base lr, and it misses the
        # distillation and mask tokens. The same parameters, whatever timm's version, keep resume working.
        stem = "|".join(_EMBEDDINGS)
        return {"stem": rf"^backbone\.(?:{stem})", "blocks": r"^backbone\.blocks\.(\d+)"}


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


def no_decay_names(module: nn.Module) -> list[str]:
    """The names of ``module``'s learnt tokens (class, register, distillation and mask tokens, position
    embeddings): BEiT, MAE and DeiT exempt them from weight decay although they are not 1-D, which timm's
    own rule (1-D parameters only) does not see. Exact names, so timm's wildcard match is an equality."""
    return [n for n, _ in module.named_parameters() if n.split(".")[-1].startswith(_NO_DECAY_NAMES)]


def param_groups(
    model: FineTuneModel, weight_decay: float, layer_decay: float
) -> tuple[list[dict[str, Any]], DecayPlan]:
    """AdamW parameter groups of ``model``: one per (layer, decayed or not), each with ``lr_scale`` (the
    factor on the scheduled lr), its ``weight_decay`` and the ``names`` of its parameters. Frozen
    parameters are left out.

    timm makes the groups (``param_groups_layer_decay`` on ``model.group_matcher``'s layers, scale
    ``layer_decay ** (top - layer)``). They are put in order of (layer, decayed), parameters within one
    in ``named_parameters`` order (the backbone's, then the classifier's): checkpoints store the optimizer
    state by position, so this order, the one fine-tuning always used, is what lets a run resume."""
    vit = isinstance(model.backbone, VisionTransformer)
    exempt = no_decay_names(model)
    # timm tells a decayed group from an exempt one only by its weight decay. Asking for 1.0 keeps that
    # mark at --weight-decay 0, where param_groups_weight_decay would otherwise merge everything into one
    # group (and the group count would no longer match the checkpoints'); the real value is set below.
    if vit:
        made = param_groups_layer_decay(model, 1.0, no_weight_decay_list=exempt, layer_decay=layer_decay)
    else:
        # One layer: param_groups_layer_decay would give the same groups, with a warning that the decay
        # has no effect.
        made = param_groups_weight_decay(model, 1.0, no_weight_decay_list=exempt)
    # timm's groups come in order of first appearance, and its scales tie at layer_decay 1: sort them by
    # the layer numbers they were made with (the call param_groups_layer_decay makes).
    layer_of = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    name_of = {id(p): n for n, p in model.named_parameters()}
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for made_group in made:
        params = made_group["params"]
        decayed = made_group["weight_decay"] > 0
        key = (layer_of[name_of[id(params[0])]], decayed)
        groups[key] = {
            "params": params,
            "names": [name_of[id(p)] for p in params],
            "lr_scale": made_group.get("lr_scale", 1.0),  # param_groups_weight_decay's: the base lr
            "weight_decay": weight_decay if decayed else 0.0,
        }
    plan = DecayPlan(layer_decay, vit, len(model.backbone.blocks) if vit else 0)
    return [groups[k] for k in sorted(groups)], plan
