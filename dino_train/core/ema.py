"""The teacher as an exponential moving average of the student's parameters."""

from __future__ import annotations

import torch


@torch.no_grad()
def ema_update_(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float) -> None:
    """In place: teacher = momentum * teacher + (1 - momentum) * student, for every pair of tensors.

    Parameters only, as in the original: buffers such as BatchNorm statistics are not averaged.
    The foreach ops do the whole list in a few kernels instead of one per parameter.
    """
    if len(teacher) != len(student):
        raise ValueError(f"teacher has {len(teacher)} parameters, student {len(student)}")
    torch._foreach_mul_(teacher, momentum)
    torch._foreach_add_(teacher, [s.detach() for s in student], alpha=1.0 - momentum)
