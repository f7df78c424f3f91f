"""The teacher as an exponential moving average of the student's parameters."""

from __future__ import annotations

import torch


@torch.no_grad()
def ema_update_(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float) -> None:
    """In place: teacher = momentum * teacher + (1 - momentum) * student, for every pair of tensors.

    Parameters only, as in the original: buffers such as BatchNorm statistics are not averaged.
    Written as teacher += (1 - momentum) (student - teacher), one foreach lerp: a single pass over the
    teacher (read and write) and the student (read), where a multiply then an add make two passes over
    the teacher. Equal to the product form within float rounding; momentum 1 keeps the teacher and 0
    copies the student exactly.
    """
    if len(teacher) != len(student):
        raise ValueError(f"teacher has {len(teacher)} parameters, student {len(student)}")
    torch._foreach_lerp_(teacher, [s.detach() for s in student], 1.0 - momentum)
