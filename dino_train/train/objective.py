"""The training objective: DINO's loss on the CLS token, with the successors' terms as options beside it
(Sinkhorn-Knopp targets, KoLeo, iBOT's masked-patch loss). Each term is a pure function of
``dino_train.core``; this module holds their state (the centers) and weights, and reads its settings from
the config once. A new objective is one term here plus a weight in the config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dino_train.config import Config
from dino_train.core.centering import batch_center, sinkhorn_knopp, update_center
from dino_train.core.ibot import (
    ibot_token_loss,
    masked_token_weights,
    patch_center_update,
    teacher_patch_targets,
)
from dino_train.core.koleo import koleo_per_crop
from dino_train.core.loss import DINOLoss, centered_teacher, dino_cross_entropy
from dino_train.models.wrapper import CropOutputs

Reduce = Callable[[torch.Tensor], torch.Tensor] | None


@dataclass
class LossTerms:
    """The optimised ``total`` and its parts, each a scalar tensor (detach before logging)."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


class PatchCenter(nn.Module):
    """The iBOT patch head's momentum center, a (1, K) buffer saved as the checkpoint's ``ibot_loss``."""

    def __init__(self, out_dim: int, momentum: float):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, out_dim))


class Objective(nn.Module):
    """``forward(student, teacher, masks, teacher_temp)`` -> LossTerms; ``update(teachers)`` after the
    optimizer step moves the centers (the release updates its center after the loss)."""

    def __init__(self, cfg: Config, reduce: Reduce = None):
        super().__init__()
        k, ib = cfg.dino, cfg.ibot
        self.dino = DINOLoss(
            cfg.model.out_dim, 2 + cfg.data.local_crops_number, k.student_temp, k.center_momentum
        )
        self.sinkhorn = k.centering == "sinkhorn_knopp"
        self.sk_iterations, self.koleo_weight, self.reduce = k.sinkhorn_iterations, k.koleo_weight, reduce
        self.koleo_on = k.koleo_on
        self.ibot_weight, self.ibot_temp = ib.loss_weight, ib.teacher_temp
        if self.ibot_weight:
            self.patch = PatchCenter(
                (ib.out_dim if ib.separate_head else 0) or cfg.model.out_dim, ib.center_momentum
            )

    @property
    def uses_patches(self) -> bool:
        return self.ibot_weight > 0

    def targets(self, logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
        """Teacher distributions from (R, K) logits: Sinkhorn-Knopp over all ranks' rows, or centred."""
        if self.sinkhorn:
            return sinkhorn_knopp(logits, temp, self.sk_iterations, self.reduce)
        return centered_teacher(logits, center, temp)

    def forward(
        self, student: CropOutputs, teacher: CropOutputs, masks: torch.Tensor | None, teacher_temp: float
    ) -> LossTerms:
        terms = dino_cross_entropy(
            student.logits, self.targets(teacher.logits, self.dino.center, teacher_temp), self.dino.n_crops,
            self.dino.student_temp,
        )  # fmt: skip
        total = terms.total
        parts = {"loss_dino": terms.total, "loss_global_global": terms.global_global,
                 "loss_global_local": terms.global_local}  # fmt: skip
        if self.koleo_weight:
            n_global = teacher.logits.shape[0]  # the teacher sees the two global crops only
            spread = student.bottleneck if self.koleo_on == "bottleneck" else student.features
            if spread is None:
                raise ValueError("dino.koleo_on=bottleneck needs the DINO head's bottleneck")
            parts["loss_koleo"] = koleo_per_crop(spread[:n_global], 2)
            total = total + self.koleo_weight * parts["loss_koleo"]
        if self.uses_patches and masks is not None:
            parts["loss_ibot"] = self._ibot(student, teacher, masks, teacher_temp)
            total = total + self.ibot_weight * parts["loss_ibot"]
        return LossTerms(total, parts)

    def _ibot(
        self, student: CropOutputs, teacher: CropOutputs, masks: torch.Tensor, temp: float
    ) -> torch.Tensor:
        """Each global crop's masked patches against the teacher's patches of the same, unmasked crop;
        both heads' outputs hold the masked positions only, in the order of ``tokens[masks]``."""
        temp = self.ibot_temp or temp
        t = teacher.patch_logits
        if self.sinkhorn:
            probs = sinkhorn_knopp(t, temp, self.sk_iterations, self.reduce)
        else:
            probs = teacher_patch_targets(t, self.patch.center, temp)
        weights = masked_token_weights(masks).to(t.device)
        return ibot_token_loss(student.patch_logits, probs, weights, self.dino.student_temp)

    @torch.no_grad()
    def update(self, teachers: list[CropOutputs]) -> None:
        """Move the momentum centers with this step's teacher outputs (all micro-batches, all ranks)."""
        if self.sinkhorn:
            return  # Sinkhorn-Knopp needs no running center
        logits = torch.cat([t.logits for t in teachers])
        d = self.dino
        d.center.copy_(update_center(d.center, batch_center(logits, self.reduce), d.center_momentum))
        if self.uses_patches:
            patches = torch.cat([t.patch_logits for t in teachers])
            self.patch.center.copy_(
                patch_center_update(self.patch.center, patches, self.patch.momentum, self.reduce)
            )
