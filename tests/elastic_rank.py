"""Run under torchrun by test_multinode: train, optionally SIGKILL one rank at a given step once (the
first time any process gets there: a marker file, since TORCHELASTIC_RESTART_COUNT is counted per agent
and stays 0 on an agent restarted by another's failure), then save this rank's teacher and center.

    elastic_rank.py OUT KILL_RANK KILL_STEP [overrides...]     (KILL_STEP 0: no kill)
"""

import os
import signal
import sys
from pathlib import Path

import torch

from dino_train.config import load_config
from dino_train.runtime.distributed import detect_env
from dino_train.train import loop as train_module
from dino_train.train import step as engine

if __name__ == "__main__":
    out, kill_rank, kill_step, overrides = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    env = detect_env()
    marker = out / "killed"
    real_step = engine.train_step
    calls = {"n": 0}

    def step_or_die(*args, **kwargs):
        calls["n"] += 1
        if env.rank == kill_rank and calls["n"] == kill_step and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or a lost node would: no clean-up
        return real_step(*args, **kwargs)

    train_module.train_step = step_or_die
    result = train_module.train(load_config(None, overrides))
    torch.save(
        {
            "teacher": result.teacher.state_dict(),
            "center": result.center,
            "world_size": env.world_size,
            "pid": os.getpid(),
            "step": result.step,
        },
        out / f"rank{env.rank}.pt",
    )
