"""DINO's cross-entropy over crop pairs, and ``DINOLoss``, which computes its teacher targets and owns the
release's center (pure tensor maths).

The reduction across processes is injected (``reduce``), so the maths runs and is tested without a
process group.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dino_train.core.centering import (
    AllReduceSum,
    Centering,
    batch_center,
    check_centering,
    sinkhorn_knopp,
    update_center,
)


class DinoLossTerms(NamedTuple):
    total: torch.Tensor  # the loss that is optimised: mean over all (teacher, student) pairs
    global_global: torch.Tensor  # mean over the two global-global pairs
    global_local: torch.Tensor  # mean over the global-local pairs (nan without local crops)


def centered_teacher(teacher_out: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """The release's teacher targets: softmax((logits - center) / teacher_temp), float32, no grad."""
    return F.softmax((teacher_out.float() - center) / teacher_temp, dim=-1).detach()


def dino_cross_entropy(
    student_out: torch.Tensor, teacher_probs: torch.Tensor, n_crops: int, student_temp: float
) -> DinoLossTerms:
    """Cross-entropy between teacher targets and the student, over crop pairs.

    Args:
        student_out: (n_crops * B, K) student logits, crops stacked as [g1, g2, l1, ..., lN].
        teacher_probs: (2 * B, K) teacher distributions of the two global crops (centred and sharpened,
            or Sinkhorn-Knopp balanced).

    Every teacher global crop is paired with every student crop except the same view; each pair
    contributes its batch mean, and the pairs are averaged (2 * (n_crops - 1) of them).
    """
    if n_crops < 2:
        raise ValueError(f"DINO needs at least the two global crops, got n_crops={n_crops}")
    batch = teacher_probs.shape[0] // 2
    if student_out.shape[0] != n_crops * batch:
        raise ValueError(
            f"student_out has {student_out.shape[0]} rows, expected n_crops * B = {n_crops * batch}"
        )
    log_p = F.log_softmax(student_out.float() / student_temp, dim=-1).view(n_crops, batch, -1)
    q = teacher_probs.float().view(2, batch, -1)
    # Cross-entropy of each pair, batch mean: ce[t, v] = mean_b sum_k -q[t] log_p[v].
    ce = -torch.einsum("tbk,vbk->tv", q, log_p) / batch  # (2, n_crops)
    global_global = ce[0, 1] + ce[1, 0]
    global_local = ce[:, 2:].sum()
    n_local_terms = 2 * (n_crops - 2)
    total = (global_global + global_local) / (2 * (n_crops - 1))
    gl_mean = global_local / n_local_terms if n_local_terms else torch.full_like(total, float("nan"))
    return DinoLossTerms(total, global_global / 2, gl_mean)


class DINOLoss(nn.Module):
    """DINO's loss on the CLS token with the state it needs: the teacher's momentum center.

    Its state dict is the original release's ``dino_loss`` entry: ``{"center": (1, K)}`` and nothing else,
    so checkpoints of either load into the other. With ``centering="sinkhorn_knopp"`` (dinov2) the teacher
    targets are Sinkhorn-Knopp balanced instead; the center is kept (at zero) so the layout stays the same.
    ``reduce`` sums a tensor over processes (None: one process): the center's batch mean and Sinkhorn-Knopp
    cover every rank's rows.
    """

    def __init__(
        self,
        out_dim: int,
        n_crops: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: Centering = "center",
        sinkhorn_iterations: int = 3,
        reduce: AllReduceSum | None = None,
    ):
        super().__init__()
        self.n_crops = n_crops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering = check_centering(centering)
        self.sinkhorn_iterations = sinkhorn_iterations
        self.reduce = reduce
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_targets(self, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """(2 * B, K) teacher logits -> (2 * B, K) float32 distributions, without grad."""
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_out, teacher_temp, self.sinkhorn_iterations, self.reduce)
        return centered_teacher(teacher_out, self.center, teacher_temp)

    def forward(
        self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float
    ) -> DinoLossTerms:
        """student_out (n_crops * B, K), teacher_out (2 * B, K) logits -> ``dino_cross_entropy``'s terms."""
        targets = self.teacher_targets(teacher_out, teacher_temp)
        return dino_cross_entropy(student_out, targets, self.n_crops, self.student_temp)

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """EMA of the mean teacher logit over every rank's rows: teacher_out (R, K), e.g. all of a step's
        micro-batches. Called after the loss, as the release does, so each step uses the center of the
        previous steps. Sinkhorn-Knopp keeps no running center: a no-op (and no collective) then."""
        if self.centering == "sinkhorn_knopp":
            return
        self.center.copy_(
            update_center(self.center, batch_center(teacher_out, self.reduce), self.center_momentum)
        )
