"""The Gram teacher of Gram anchoring (``gram.*``; the loss is ``dino_train.core.gram``): a frozen copy of
the EMA teacher's backbone, taken at ``gram.start_step`` and again every ``gram.refresh_every`` steps, that
gives the patch features whose Gram matrices the student keeps. It is part of the checkpoint
(``gram_teacher``), so a resumed run anchors to the same snapshot as an uninterrupted one."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dino_train.config import GramConfig
from dino_train.core.gram import resize_patch_grid
from dino_train.models.backbone import patch_size_of


class GramTeacher:
    """``before_step(step, teacher_backbone)`` takes the snapshot when it is due; once taken, ``targets``
    gives the Gram teacher's patch features of the global crops."""

    def __init__(self, cfg: GramConfig, teacher_backbone: nn.Module):
        self.cfg = cfg
        self.backbone = copy.deepcopy(teacher_backbone)
        self.backbone.requires_grad_(False)
        self.patch = patch_size_of(self.backbone)
        self.taken_at: int | None = None  # the step of the current snapshot; None before the first

    @property
    def active(self) -> bool:
        return self.taken_at is not None

    def due(self, step: int) -> bool:
        c = self.cfg
        if step < c.start_step:
            return False
        return self.taken_at is None or (c.refresh_every > 0 and step - self.taken_at >= c.refresh_every)

    @torch.no_grad()
    def before_step(self, step: int, teacher_backbone: nn.Module) -> bool:
        """Copy the EMA teacher's backbone when a snapshot is due at ``step``; True when one was taken."""
        if not self.due(step):
            return False
        self.backbone.load_state_dict(teacher_backbone.state_dict())
        self.taken_at = step
        return True

    @torch.no_grad()
    def targets(self, global_crops: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) crops -> (B, N, D) the Gram teacher's output patch features on the student's
        (H / p) x (W / p) grid; with ``teacher_scale`` s the crops are enlarged s times (bicubic, to a
        multiple of the patch size) and the features brought back to that grid."""
        p, (h, w) = self.patch, global_crops.shape[-2:]
        x = global_crops
        if self.cfg.teacher_scale != 1:
            size = [max(p, round(n * self.cfg.teacher_scale / p) * p) for n in (h, w)]
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        tokens = self.backbone.forward_features(x)[:, self.backbone.num_prefix_tokens :]
        return resize_patch_grid(tokens, (x.shape[-2] // p, x.shape[-1] // p), (h // p, w // p))

    def state_dict(self) -> dict[str, Any]:
        return {"backbone": self.backbone.state_dict(), "taken_at": self.taken_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.backbone.load_state_dict(state["backbone"])
        self.taken_at = state["taken_at"]
