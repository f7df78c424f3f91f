"""FLOPs of a step, counted, not estimated (the matmul peak they are measured against is
``dino_train.runtime.precision.matmul_flops``, which training's ``auto`` precision also uses)."""

from __future__ import annotations

from collections.abc import Callable

from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations torch dispatches while ``fn`` runs (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())
