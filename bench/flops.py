"""FLOPs of a step (counted, not estimated) and the machine's measured matrix-multiply peak."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations torch dispatches while ``fn`` runs (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 4096, seconds: float = 2.0) -> float:
    """Sustained FLOP/s of an n x n matmul in ``dtype``: the ceiling the step is measured against."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)  # warm up kernels and caches
    if device.type == "cuda":
        torch.cuda.synchronize()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        reps += 1
        if device.type == "cuda" and reps % 10 == 0:
            torch.cuda.synchronize()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)
