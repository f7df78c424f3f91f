"""How `auto` precision chooses, and that ranks end up with rank 0's choice."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from dino_train.config import ConfigError
from dino_train.runtime import distributed as D
from dino_train.runtime.precision import (
    BF16_MIN_SPEEDUP,
    cpu_lists_bf16,
    cpu_matmul_gflops,
    pick_cpu_precision,
    resolve_precision,
)
from tests.helpers import fork_ranks

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "bf16, fp32, expected",
    [(360.0, 150.0, "bf16"), (170.0, 330.0, "fp32"), (110.0, 100.0, "fp32"), (120.0, 100.0, "bf16")],
)
def test_bf16_is_chosen_only_when_clearly_faster(bf16: float, fp32: float, expected: str) -> None:
    assert BF16_MIN_SPEEDUP == pytest.approx(1.2)  # the two boundary cases above are written for it
    assert pick_cpu_precision({"bf16": bf16, "fp32": fp32}) == expected


def test_auto_on_this_cpu_takes_the_faster_precision_and_says_why() -> None:
    chosen, note = resolve_precision("auto", CPU)
    if not cpu_lists_bf16():
        assert (chosen, note) == ("fp32", "auto: this CPU has no bf16 instructions")
        return
    measured = cpu_matmul_gflops()
    assert all(v > 0 for v in measured.values())
    assert chosen == pick_cpu_precision(measured)
    assert f"bf16 {measured['bf16']:.0f} vs fp32 {measured['fp32']:.0f} GFLOP/s" in note


@pytest.mark.parametrize("requested", ["fp32", "bf16"])
def test_an_explicit_precision_is_kept(requested: str) -> None:
    assert resolve_precision(requested, CPU) == (requested, "")


def test_fp16_on_the_cpu_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="train.precision"):
        resolve_precision("fp16", CPU)


def _broadcast_rank(rank: int, port: int, results) -> None:
    env = D.DistEnv(rank=rank, local_rank=rank, world_size=2, master_port=port, source="torchrun")
    D.init_distributed(env, CPU, timeout_s=60)
    try:
        results[rank] = int(D.broadcast_from_main(torch.tensor([10 + rank])).item())
    finally:
        D.cleanup()


@pytest.mark.dist
def test_broadcast_from_main_gives_every_rank_rank_0s_value() -> None:
    # What train() relies on when ranks measured different speeds: both train in rank 0's precision.
    results = mp.Manager().dict()
    fork_ranks(_broadcast_rank, D.free_port(), results)
    assert dict(results) == {0: 10, 1: 10}
