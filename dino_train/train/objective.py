"""The training objective: DINO's loss on the CLS token, with the successors' terms as options beside it
(Sinkhorn-Knopp targets, KoLeo, iBOT's masked-patch loss). The losses of ``dino_train.core`` own their
state (``DINOLoss`` the release's center, ``iBOTPatchLoss`` the patch center) and their teacher targets;
this module composes them with their weights and reads their settings from the config once. A new
objective is one term here plus a weight in the config."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dino_train.config import Config
from dino_train.core.centering import AllReduceSum
from dino_train.core.gram import gram_loss
from dino_train.core.ibot import iBOTPatchLoss
from dino_train.core.koleo import koleo_per_crop
from dino_train.core.loss import DINOLoss
from dino_train.models.wrapper import CropOutputs


@dataclass
class LossTerms:
    """The optimised ``total`` and its parts, each a scalar tensor (detach before logging)."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective(nn.Module):
    """``forward(student, teacher, masks, teacher_temp)`` -> LossTerms; ``update(teachers)`` after the
    optimizer step moves the centers (the release updates its center after the loss).

    ``dino`` (a DINOLoss) is saved as the checkpoint's ``dino_loss`` entry and ``ibot`` (an iBOTPatchLoss,
    present when the iBOT term is on) as its ``ibot_loss`` entry, by ``dino_train.train.state``.
    ``reduce`` sums a tensor over processes (None: one process)."""

    def __init__(self, cfg: Config, reduce: AllReduceSum | None = None):
        super().__init__()
        k, ib = cfg.dino, cfg.ibot
        targets = {"centering": k.centering, "sinkhorn_iterations": k.sinkhorn_iterations, "reduce": reduce}
        self.dino = DINOLoss(
            cfg.model.out_dim, 2 + cfg.data.local_crops_number, k.student_temp, k.center_momentum, **targets
        )
        self.koleo_weight, self.koleo_on = k.koleo_weight, k.koleo_on
        self.ibot_weight = ib.loss_weight
        self.gram_weight = cfg.gram.weight
        if self.ibot_weight:
            self.ibot = iBOTPatchLoss(
                (ib.out_dim if ib.separate_head else 0) or cfg.model.out_dim,
                k.student_temp,
                ib.center_momentum,
                ib.teacher_temp,
                **targets,
            )

    @property
    def uses_patches(self) -> bool:
        return self.ibot_weight > 0

    def forward(
        self,
        student: CropOutputs,
        teacher: CropOutputs,
        masks: torch.Tensor | None,
        teacher_temp: float,
        gram_targets: torch.Tensor | None = None,
    ) -> LossTerms:
        """student: all crops' outputs; teacher: the two global crops'; masks (B_global, N) bool, the
        student's masked patches (None without iBOT). The patch heads' outputs hold the masked positions
        only, in the order of ``tokens[masks]``. gram_targets (B_global, N, D): the Gram teacher's patch
        features of the global crops, once it has its first snapshot (None before, and without it)."""
        terms = self.dino(student.logits, teacher.logits, teacher_temp)
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
            parts["loss_ibot"] = self.ibot(student.patch_logits, teacher.patch_logits, masks, teacher_temp)
            total = total + self.ibot_weight * parts["loss_ibot"]
        if self.gram_weight and gram_targets is not None:
            if student.patch_tokens is None:
                raise ValueError("Gram anchoring needs the student's patch tokens (forward with tokens=True)")
            parts["loss_gram"] = gram_loss(student.patch_tokens, gram_targets)
            total = total + self.gram_weight * parts["loss_gram"]
        return LossTerms(total, parts)

    @torch.no_grad()
    def update(self, teachers: list[CropOutputs]) -> None:
        """Move the momentum centers with this step's teacher outputs (all micro-batches, all ranks)."""
        if self.dino.centering == "sinkhorn_knopp":
            return  # Sinkhorn-Knopp keeps no running center (neither loss would use the stacked logits)
        self.dino.update_center(torch.cat([t.logits for t in teachers]))
        if self.uses_patches:
            self.ibot.update_center(torch.cat([t.patch_logits for t in teachers]))
