"""Position embeddings at other input sizes, by the original release's rule.

A ViT's position grid is learnt at one size (14 x 14 for 224 px at patch 16); other inputs (96 px local
crops, 480 px visualisations) resize it. The release (``interpolate_pos_encoding``) and dinov2 resize it
bicubically with a scale factor of (new grid + 0.1) / old grid and no antialiasing; timm resizes to the
exact new grid with antialiasing. The two differ by up to 0.07 in features at 64 px, so release weights
give the release's features and attention only with the release's rule, which is the default here
(``model.pos_embed_interpolation``); ``timm`` keeps timm's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

RULES = ("release", "timm")
OFFSET = 0.1  # the release's (and dinov2's interpolate_offset): avoids a floating-point size error


def release_resample(patch_pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, N, D) patch position embeddings on a square grid -> (1, h * w, D) for ``grid`` = (h, w)."""
    n, dim = patch_pos.shape[1], patch_pos.shape[2]
    side = math.isqrt(n)
    h, w = grid
    if side * side == n and (h, w) == (side, side):
        return patch_pos
    square = patch_pos.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    out = F.interpolate(square, scale_factor=((h + OFFSET) / side, (w + OFFSET) / side), mode="bicubic")
    if out.shape[-2:] != (h, w):
        raise ValueError(f"position grid {side}x{side} resampled to {tuple(out.shape[-2:])}, not {h}x{w}")
    return out.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(patch_pos.dtype)


class ReleasePosEmbedViT(VisionTransformer):
    """timm's VisionTransformer whose position embedding follows the release's rule at other sizes. Only
    how the grid is resized differs; parameters and their names are timm's (and the release's)."""

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        # timm's hook point for adding position embeddings; x is (B, h, w, D) with dynamic_img_size.
        if not self.dynamic_img_size or self.pos_embed is None:
            return super()._pos_embed(x)
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)
        prefix = [t.expand(b, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.no_embed_class:  # positions for the patches only (dinov2's register models)
            x = torch.cat([*prefix, x + release_resample(self.pos_embed, (h, w))], dim=1)
        else:
            k = self.num_prefix_tokens
            pos = torch.cat([self.pos_embed[:, :k], release_resample(self.pos_embed[:, k:], (h, w))], dim=1)
            x = torch.cat([*prefix, x], dim=1) + pos
        return self.pos_drop(x)


def use_rule(model: torch.nn.Module, rule: str) -> torch.nn.Module:
    """Switch a timm ViT to ``rule`` in place (other backbones are returned as they are)."""
    if rule not in RULES:
        raise ValueError(f"position-embedding interpolation {rule!r} is not one of {', '.join(RULES)}")
    if isinstance(model, VisionTransformer):
        model.__class__ = ReleasePosEmbedViT if rule == "release" else VisionTransformer
    return model
