"""Run under torchrun by test_fsdp: train through ``loop.Run`` (so the process group is still up at the
end), and write to OUT on rank 0 the whole student, teacher and optimizer state gathered right after the
run was built (``before``: what a resume restored) and at the end (``after``), and how each rank holds
the teacher (``local_numel`` / ``full_numel`` of its parameters, all ranks).

    fsdp_rank.py OUT [overrides...]
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from torch.distributed.tensor import DTensor

from dino_train.config import load_config
from dino_train.runtime import distributed as D
from dino_train.runtime.signals import StopSignals
from dino_train.train import loop
from dino_train.train.sharded_checkpoint import gather_full


def gathered(mods):
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {
        "student": gather_full(mods.student_plain),
        "teacher": gather_full(mods.teacher),
        "optimizer": get_optimizer_state_dict(mods.student_plain, mods.optimizer, options=opts),
    }


def holding(teacher) -> torch.Tensor:
    """(local elements, whole elements) of the teacher's parameters on this rank."""
    params = list(teacher.parameters())
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    return torch.tensor([local, sum(p.numel() for p in params)])


if __name__ == "__main__":
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    cfg = load_config(None, overrides)
    ctx, note = loop._context(cfg)
    try:
        run = loop.Run(cfg, ctx, StopSignals())
        before = gathered(run.state.mods)
        run.run(note)
        after = gathered(run.state.mods)
        held = [torch.zeros(2, dtype=torch.long) for _ in range(ctx.env.world_size)]
        dist.all_gather(held, holding(run.state.mods.teacher))
        if ctx.env.is_main:
            torch.save({"before": before, "after": after, "held": torch.stack(held), "notes": run.notes}, out)
        # Tear the group down together: a rank that destroyed it while rank 0 was still saving once
        # aborted at exit ("terminate called without an active exception") on a loaded 2-core machine.
        dist.barrier()
    finally:
        D.cleanup()
