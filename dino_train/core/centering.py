"""Centering the teacher, as pure tensor functions: the release's momentum center (``batch_center``,
``update_center``) and dinov2's Sinkhorn-Knopp targets.

DINO centres the teacher with a running mean of its logits; dinov2 replaces that by a few Sinkhorn-Knopp
iterations over the batch, which spread the batch's samples evenly over the prototypes (each prototype
gets 1/K of the mass) while every sample keeps a distribution that sums to 1. The only reduction across
processes is the injected ``all_reduce_sum``.

Numerics: the iteration is done in the log domain, in float32. The algorithm is invariant to multiplying a
prototype's row of Q = exp(logits / temp) by any positive constant (the next prototype normalisation
divides it out), and to multiplying all of Q by a constant, so the usual "normalise Q to sum 1" step and
the 1/K and 1/R_total factors of each iteration cancel exactly and are not computed: every step is a log-
sum-exp subtraction, which is finite for any finite logits (no exp of an unbounded number is ever taken).
The one sum across ranks, a prototype's mass over all samples, is a log-sum-exp of one value per rank; see
``_global_logsumexp`` for how it stays finite with a sum-only reducer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, cast

import torch

AllReduceSum = Callable[[torch.Tensor], torch.Tensor]
# How the DINO and iBOT losses make their teacher targets: the release's momentum center subtracted before
# the softmax, or dinov2's Sinkhorn-Knopp (which needs no running center).
Centering = Literal["center", "sinkhorn_knopp"]


def check_centering(centering: str) -> Centering:
    """``centering`` if it is one of ``Centering``'s values, else a ValueError (a typo would otherwise
    silently select the center)."""
    if centering not in ("center", "sinkhorn_knopp"):
        raise ValueError(f"centering must be 'center' or 'sinkhorn_knopp', got {centering!r}")
    return cast(Centering, centering)


def batch_center(teacher_out: torch.Tensor, all_reduce_sum: AllReduceSum | None = None) -> torch.Tensor:
    """Mean teacher logit over the rows of every process: (R, K) -> (1, K).

    The row count travels with the sum, so ranks with different batch sizes still give the true mean.
    """
    summed = torch.cat(
        [
            teacher_out.float().sum(dim=0),
            torch.tensor([teacher_out.shape[0]], dtype=torch.float32, device=teacher_out.device),
        ]
    )
    if all_reduce_sum is not None:
        summed = all_reduce_sum(summed)
    return (summed[:-1] / summed[-1]).unsqueeze(0)


def update_center(center: torch.Tensor, batch_mean: torch.Tensor, momentum: float) -> torch.Tensor:
    """EMA of the teacher's mean logit: momentum * center + (1 - momentum) * batch_mean."""
    return center * momentum + batch_mean * (1 - momentum)


def _global_logsumexp(
    local: torch.Tensor, has_rows: bool, all_reduce_sum: AllReduceSum | None
) -> torch.Tensor:
    """log(sum over ranks of exp(local)), elementwise for a (K,) vector of per-rank log-sums.

    A stable log-sum-exp subtracts a shift common to all ranks and at least the largest term; a max
    reduction is not available through a sum reducer, so the shift is the upper bound on the max given
    by Samuelson's inequality, max <= mean + std * sqrt(n - 1), from the first two moments over the n
    ranks (one all-reduce). For one or two ranks the bound is the max itself, so the result is exact for
    any magnitudes; with more ranks it is exact unless ranks differ by hundreds of nats, where the
    sum is clamped away from 0 and the result stays finite. Computed in float64 (K values only).
    A rank without rows contributes nothing (weight 0), so its -inf does not reach the moments.
    """
    if all_reduce_sum is None:
        return local
    weight = 1.0 if has_rows else 0.0
    v = local.double() if has_rows else torch.zeros_like(local, dtype=torch.float64)
    k = v.shape[0]
    moments = all_reduce_sum(torch.cat([v * weight, v * v * weight, v.new_full((1,), weight)]))
    n = moments[-1].clamp_min(1.0)
    mean = moments[:k] / n
    var = (moments[k : 2 * k] / n - mean * mean).clamp_min(0.0)  # rounding can make it slightly < 0
    shift = mean + (var * (n - 1)).sqrt()
    total = all_reduce_sum(torch.exp(v - shift) * weight)
    return (shift + total.clamp_min(torch.finfo(torch.float64).tiny).log()).to(local.dtype)


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: torch.Tensor,
    teacher_temp: float,
    n_iterations: int = 3,
    all_reduce_sum: AllReduceSum | None = None,
) -> torch.Tensor:
    """dinov2's Sinkhorn-Knopp targets: (R, K) teacher logits -> (R, K) float32 probabilities.

    Rows are this rank's samples (R may differ between ranks); K prototypes. Equal, in exact arithmetic,
    to: Q = exp(logits / temp) as (K, R_total) over all ranks, normalised to sum 1, then ``n_iterations``
    times rows (prototypes) to sum 1/K and columns (samples) to sum 1/R_total, times R_total. Each
    returned row sums to 1; after enough iterations each prototype's mean over all samples is 1/K.
    ``all_reduce_sum`` sums a tensor over ranks (in place or not; its result is used); None is one rank.
    Runs without grad: these are targets.
    """
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be at least 1, got {n_iterations}")
    if teacher_logits.ndim != 2:
        raise ValueError(f"teacher_logits must be (R, K), got shape {tuple(teacher_logits.shape)}")
    has_rows = teacher_logits.shape[0] > 0
    log_q = teacher_logits.float() / teacher_temp
    for _ in range(n_iterations):
        # Prototypes: equal mass over the samples of every rank (the 1/K factor cancels, see module doc).
        log_q = log_q - _global_logsumexp(torch.logsumexp(log_q, dim=0), has_rows, all_reduce_sum)
        # Samples: each a distribution over the prototypes; local to the rank. Normalising to 1 rather
        # than to 1/R_total and multiplying back at the end is the same up to a constant that cancels.
        log_q = torch.log_softmax(log_q, dim=1)
    return log_q.exp()
