import math

import pytest
import torch

from dino_train.config import load_config, plan_run
from dino_train.core.schedules import cosine_schedule, teacher_temp_schedule
from dino_train.train.build import build_run_schedules


def test_cosine_warmup_and_endpoints():
    s = cosine_schedule(1.0, 0.1, epochs=10, steps_per_epoch=5, warmup_epochs=2)
    assert len(s) == 50
    assert s[0] == 0.0  # warmup starts at 0
    assert s[9] == pytest.approx(1.0)  # and reaches base at its last step
    assert torch.allclose(s[:10], torch.linspace(0, 1, 10, dtype=torch.float64))
    assert s[10] == pytest.approx(1.0)  # cosine starts at base
    n = 40
    assert s[-1] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * (n - 1) / n)))
    assert s[-1] > 0.1  # never quite reaches final, as in the release
    assert s[10 + n // 2] == pytest.approx(0.55)  # halfway: the mean of base and final
    assert torch.all(s[10:-1] >= s[11:])  # monotone after warmup


def test_cosine_without_warmup():
    s = cosine_schedule(0.04, 0.4, epochs=3, steps_per_epoch=4)
    assert s[0] == pytest.approx(0.04) and len(s) == 12 and s[-1] < 0.4


def test_teacher_temp_per_epoch_and_per_step():
    per_epoch = teacher_temp_schedule(0.04, 0.07, warmup_epochs=3, epochs=5, steps_per_epoch=2)
    assert per_epoch.tolist() == pytest.approx([0.04, 0.04, 0.055, 0.055, 0.07, 0.07, 0.07, 0.07, 0.07, 0.07])
    per_step = teacher_temp_schedule(0.04, 0.07, warmup_epochs=3, epochs=5, steps_per_epoch=2, per_step=True)
    assert per_step[0] == pytest.approx(0.04) and per_step[5] == pytest.approx(0.07)
    assert per_step[2] == pytest.approx(0.04 + 0.03 * 2 / 5)
    const = teacher_temp_schedule(0.04, 0.04, 0, 4, 3)
    assert torch.all(const == 0.04) and len(const) == 12


def test_run_schedules_at():
    cfg = load_config(
        None,
        [
            "data.path=x",
            "optim.lr=0.001",
            "optim.min_lr=1e-6",
            "optim.warmup_epochs=1",
            "dino.teacher_temp=0.07",
            "dino.warmup_teacher_temp_epochs=1",
            "train.epochs=4",
        ],
    )
    s = build_run_schedules(cfg, plan_run(cfg, world_size=1, steps_per_epoch=10))
    assert len(s) == 40
    v0 = s.at(0)
    assert (v0.lr, v0.weight_decay, v0.momentum, v0.teacher_temp) == pytest.approx((0.0, 0.04, 0.996, 0.04))
    assert s.at(9).lr == pytest.approx(0.001 * 64 / 256)  # the peak is the lr scaled by the batch of 64
    assert s.at(39).momentum > 0.9999 and s.at(39).weight_decay > 0.399
    assert s.at(1000) == s.at(39)  # past the end the final values hold
