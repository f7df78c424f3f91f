"""Per-step schedules as precomputed arrays indexed by the global step, as the original release does."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def cosine_schedule(
    base: float,
    final: float,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0.0,
) -> torch.Tensor:
    """Linear warmup from ``start_warmup_value`` to ``base``, then a half cosine from ``base`` to ``final``.

    Returns a float64 tensor of length ``epochs * steps_per_epoch``. As in the original, the cosine index
    never reaches its end, so the last value stays slightly above ``final``.
    """
    total = epochs * steps_per_epoch
    warmup = warmup_epochs * steps_per_epoch
    warm = (
        torch.linspace(start_warmup_value, base, warmup, dtype=torch.float64)
        if warmup > 0
        else torch.empty(0)
    )
    n = total - warmup
    i = torch.arange(n, dtype=torch.float64)
    cos = final + 0.5 * (base - final) * (1 + torch.cos(math.pi * i / max(n, 1)))
    return torch.cat([warm.to(torch.float64), cos])


def teacher_temp_schedule(
    warmup_temp: float,
    temp: float,
    warmup_epochs: int,
    epochs: int,
    steps_per_epoch: int,
    per_step: bool = False,
) -> torch.Tensor:
    """Teacher temperature: linear warmup from ``warmup_temp`` to ``temp``, then constant.

    The original release holds one value per epoch (``per_step=False``); dinov2 interpolates per step.
    Either way the result has one entry per step.
    """
    if per_step:
        warm_steps = warmup_epochs * steps_per_epoch
        warm = torch.linspace(warmup_temp, temp, warm_steps, dtype=torch.float64)
        rest = torch.full((epochs * steps_per_epoch - warm_steps,), temp, dtype=torch.float64)
        return torch.cat([warm, rest])
    per_epoch = torch.cat(
        [
            torch.linspace(warmup_temp, temp, warmup_epochs, dtype=torch.float64),
            torch.full((epochs - warmup_epochs,), temp, dtype=torch.float64),
        ]
    )
    return per_epoch.repeat_interleave(steps_per_epoch)


@dataclass(frozen=True)
class StepValues:
    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float


@dataclass
class Schedules:
    """All per-step values of one run; each tensor has ``epochs * steps_per_epoch`` entries."""

    lr: torch.Tensor
    weight_decay: torch.Tensor
    momentum: torch.Tensor
    teacher_temp: torch.Tensor

    def __len__(self) -> int:
        return len(self.lr)

    def at(self, step: int) -> StepValues:
        # Past the planned end (a run extended with max_steps) the final values hold.
        i = min(step, len(self.lr) - 1)
        return StepValues(
            lr=float(self.lr[i]),
            weight_decay=float(self.weight_decay[i]),
            momentum=float(self.momentum[i]),
            teacher_temp=float(self.teacher_temp[i]),
        )
