"""Run under torchrun by test_train_e2e: train, then save this rank's teacher and center."""

import sys
from pathlib import Path

import torch

from dino_train.config import load_config
from dino_train.runtime.distributed import detect_env
from dino_train.train import train

if __name__ == "__main__":
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    env = detect_env()
    result = train(load_config(None, overrides))
    torch.save(
        {"teacher": result.teacher.state_dict(), "center": result.center, "world_size": env.world_size},
        out / f"rank{env.rank}.pt",
    )
