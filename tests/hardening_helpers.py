"""Shared by the hardening tests (safe loading, checksums, failed saves, stop signals, progress output):
a subprocess environment and a training checkpoint's layout in miniature."""

import os

import torch

from tests.conftest import REPO

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def training_state(step: int, size: int = 8) -> dict:
    """Our checkpoint layout in miniature."""
    return {
        "student": {"module.backbone.w": torch.full((size,), float(step))},
        "teacher": {"backbone.w": torch.arange(size, dtype=torch.float32) + step},
        "optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "epoch": step,
        "step": step,
        "dino_loss": {"center": torch.zeros(1, 3)},
        "config": {"train": {"epochs": 3}},
    }
