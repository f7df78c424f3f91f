"""iBOT's masked-patch objective (Zhou et al. 2022; used by dinov2), as pure tensor functions.

The student sees a global crop with some patch tokens masked; the teacher sees it unmasked. For each
masked patch the student's patch-head output is trained towards the teacher's centred, sharpened
output at the same position (a cross-entropy, as DINO's for the CLS token). The teacher's patch head has
its own center, a running mean of the patch outputs it computes: in training those of the masked
positions only (as dinov2 does; the heads are not run elsewhere, which saves most of their cost).

Normalisation: each image's loss is the mean over its masked patches. Images are then averaged over
``mean_over``: "masked_images" (the default: images with at least one masked patch) or "all_images"
(every image of the batch, unmasked ones counting 0), which is what the released iBOT and dinov2 code
divide by, i.e. the default times the fraction of masked images.

``iBOTPatchLoss`` puts these together with the state they need (the patch center), as dinov2's module of
that name does; the functions stay for the maths and its tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dino_train.core.centering import AllReduceSum, Centering, check_centering, sinkhorn_knopp

MeanOver = Literal["masked_images", "all_images"]


def masked_token_weights(masks: torch.Tensor, mean_over: MeanOver = "masked_images") -> torch.Tensor:
    """Weight of each masked token, in the order of ``x[masks]``: masks (B, N) bool -> (M,) float32.

    A token of image b weighs 1 / (masked tokens of b) / (number of images averaged over), so that the
    weighted sum of per-token losses is the mean over images of each image's mean over masked patches.
    """
    if mean_over not in ("masked_images", "all_images"):
        raise ValueError(f"mean_over must be 'masked_images' or 'all_images', got {mean_over!r}")
    counts = masks.sum(dim=1).float()  # (B,)
    n_images = (counts > 0).sum().float() if mean_over == "masked_images" else float(masks.shape[0])
    per_image = 1.0 / (counts.clamp_min(1.0) * max(float(n_images), 1.0))
    return per_image.unsqueeze(1).expand_as(masks)[masks]


def ibot_token_loss(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, weights: torch.Tensor, student_temp: float
) -> torch.Tensor:
    """sum_m weights[m] * CE(teacher_probs[m], softmax(student_logits[m] / student_temp)).

    For the masked tokens already gathered: student_logits and teacher_probs (M, K), weights (M,)
    (e.g. ``masked_token_weights``). Computed in float32; scalar; 0 (with a graph) when M = 0.
    """
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    ce = -(teacher_probs.float() * log_p).sum(dim=-1)  # (M,)
    return (ce * weights).sum()


def ibot_patch_loss(
    student_patch_logits: torch.Tensor,
    teacher_patch_probs: torch.Tensor,
    masks: torch.Tensor,
    student_temp: float,
    mean_over: MeanOver = "masked_images",
) -> torch.Tensor:
    """iBOT loss over the masked patches: logits and probs (B, N, K), masks (B, N) bool (True = masked).

    loss_b = sum over masked n of CE(t[b, n], s[b, n] / student_temp) / max(1, masked patches of b),
    averaged over ``mean_over`` (module doc). Unmasked positions are never read into the loss, so they
    neither change it nor receive gradient. Scalar; 0 with a graph to the student when nothing is masked.
    """
    if (
        student_patch_logits.shape != teacher_patch_probs.shape
        or masks.shape != student_patch_logits.shape[:2]
    ):
        raise ValueError(
            f"shapes disagree: student {tuple(student_patch_logits.shape)}, "
            f"teacher {tuple(teacher_patch_probs.shape)}, masks {tuple(masks.shape)}"
        )
    masks = masks.bool()
    weights = masked_token_weights(masks, mean_over).to(student_patch_logits.device)
    return ibot_token_loss(student_patch_logits[masks], teacher_patch_probs[masks], weights, student_temp)


@torch.no_grad()
def teacher_patch_targets(
    teacher_patch_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float
) -> torch.Tensor:
    """softmax((logits - center) / teacher_temp) over the last dim in float32, without grad.

    teacher_patch_logits (..., K), e.g. (B, N, K); center (1, K) broadcasts. Same shape out.
    """
    return F.softmax((teacher_patch_logits.float() - center.float()) / teacher_temp, dim=-1)


@torch.no_grad()
def patch_center_update(
    center: torch.Tensor,
    teacher_patch_logits: torch.Tensor,
    momentum: float,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """New patch center: center * momentum + (mean teacher patch logit) * (1 - momentum), (1, K).

    The mean is over every token given ((..., K): all patches, as iBOT centres them, or the masked ones,
    as dinov2 and our training do) of every rank. Sum and token count travel in one all-reduced tensor,
    so ranks with different numbers of tokens still give the mean over all of them.
    """
    k = teacher_patch_logits.shape[-1]
    tokens = teacher_patch_logits.float().reshape(-1, k)
    summed = torch.cat([tokens.sum(dim=0), tokens.new_full((1,), float(tokens.shape[0]))])
    if all_reduce_sum is not None:
        summed = all_reduce_sum(summed)
    mean = (summed[:-1] / summed[-1]).unsqueeze(0)
    return center * momentum + mean * (1 - momentum)


class iBOTPatchLoss(nn.Module):
    """iBOT's masked-patch loss with its state: the teacher patch head's momentum center.

    Its state dict is ``{"center": (1, K)}``, the checkpoint's ``ibot_loss`` entry. The teacher targets are
    centred with it, or Sinkhorn-Knopp balanced over every rank's masked tokens (``centering``, as the DINO
    loss's; the center then stays at zero). ``teacher_temp`` 0 follows the temperature given to
    ``forward`` (the DINO teacher's schedule). ``reduce`` sums a tensor over processes (None: one process).
    """

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        teacher_temp: float = 0.0,
        centering: Centering = "center",
        sinkhorn_iterations: int = 3,
        reduce: AllReduceSum | None = None,
        mean_over: MeanOver = "masked_images",
    ):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.teacher_temp = teacher_temp
        self.centering = check_centering(centering)
        self.sinkhorn_iterations = sinkhorn_iterations
        self.reduce = reduce
        self.mean_over = mean_over
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_targets(self, teacher_patch_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """(M, K) teacher logits of the masked tokens -> (M, K) float32 distributions, without grad."""
        temp = self.teacher_temp or teacher_temp
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_patch_logits, temp, self.sinkhorn_iterations, self.reduce)
        return teacher_patch_targets(teacher_patch_logits, self.center, temp)

    def forward(
        self,
        student_patch_logits: torch.Tensor,
        teacher_patch_logits: torch.Tensor,
        masks: torch.Tensor,
        teacher_temp: float,
    ) -> torch.Tensor:
        """The loss over the masked tokens, already gathered in the order of ``tokens[masks]``: student and
        teacher logits (M, K), masks (B, N) bool with M True values (the student's masked global crops,
        which the teacher saw unmasked). Scalar; 0 with a graph when nothing is masked."""
        probs = self.teacher_targets(teacher_patch_logits, teacher_temp)
        weights = masked_token_weights(masks, self.mean_over).to(teacher_patch_logits.device)
        return ibot_token_loss(student_patch_logits, probs, weights, self.student_temp)

    @torch.no_grad()
    def update_center(self, teacher_patch_logits: torch.Tensor) -> None:
        """EMA of the mean teacher patch logit over every rank's tokens: teacher_patch_logits (..., K), e.g.
        the masked tokens of all of a step's micro-batches. Called after the loss, so each step uses the
        center of the previous steps. A no-op (and no collective) with Sinkhorn-Knopp."""
        if self.centering == "sinkhorn_knopp":
            return
        self.center.copy_(
            patch_center_update(self.center, teacher_patch_logits, self.center_momentum, self.reduce)
        )
