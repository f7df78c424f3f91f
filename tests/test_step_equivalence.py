"""Gradient accumulation, activation checkpointing, fused attention and torch.compile give the same step
as the plain path (explicit softmax attention, eager, one batch).

SGD, so the update is linear in the gradient (Adam's first step is sign(g) * lr, which amplifies float
noise on gradients that are zero in exact arithmetic, such as the attention's key bias)."""

import pytest
import torch

from dino_train.config import load_config
from dino_train.core.schedules import StepValues
from dino_train.runtime.distributed import DistEnv
from dino_train.train.build import build_modules
from dino_train.train.step import StepSettings, train_step

pytestmark = pytest.mark.slow

VALUES = StepValues(lr=1e-3, weight_decay=0.04, momentum=0.9, teacher_temp=0.04)


def modules(**train):
    train.setdefault("fused_attention", "explicit")
    overrides = [
        "data.path=x",
        "model.arch=vit_tiny",
        "model.patch_size=8",
        "model.out_dim=64",
        "model.drop_path_rate=0",
        "model.head_hidden_dim=32",
        "model.head_bottleneck_dim=16",
        "data.batch_size_per_gpu=8",
        "data.global_crops_size=32",
        "data.local_crops_number=3",
        "data.local_crops_size=16",
        "train.precision=fp32",
        "optim.optimizer=sgd",
        *(f"train.{k}={v}" for k, v in train.items()),
    ]
    return build_modules(load_config(None, overrides), DistEnv(), torch.device("cpu"), "fp32")


def step(mods, crops, accumulation_steps=1):
    settings = StepSettings(
        "fp32", torch.device("cpu"), freeze_last_layer=1, accumulation_steps=accumulation_steps
    )
    return train_step(mods, settings, crops, VALUES, epoch=3)


@pytest.mark.parametrize(
    "levers, accum",
    [
        ({"accumulation_steps": 4}, 4),
        ({"grad_checkpointing": "true"}, 1),
        ({"fused_attention": "fused"}, 1),
        ({"compile": "true"}, 1),
    ],
)
def test_lever_matches_plain_step(levers, accum):
    torch.manual_seed(0)
    crops = [torch.randn(8, 3, 32, 32) for _ in range(2)] + [torch.randn(8, 3, 16, 16) for _ in range(3)]
    plain, lever = modules(), modules(**levers)
    a, b = step(plain, crops), step(lever, crops, accum)
    assert b.loss.item() == pytest.approx(a.loss.item(), rel=1e-5)
    for (name, x), (_, y) in zip(
        plain.student_plain.state_dict().items(), lever.student_plain.state_dict().items(), strict=True
    ):
        assert torch.allclose(x, y, atol=1e-5, rtol=1e-4), name
    for (name, x), (_, y) in zip(
        plain.teacher.state_dict().items(), lever.teacher.state_dict().items(), strict=True
    ):
        assert torch.allclose(x, y, atol=1e-5, rtol=1e-4), name
    # The center moved once, from all 16 teacher rows, not per micro-batch.
    assert torch.allclose(plain.objective.dino.center, lever.objective.dino.center, atol=1e-6)
    assert not torch.equal(lever.objective.dino.center, torch.zeros_like(lever.objective.dino.center))


def test_accumulation_must_divide_the_batch():
    from dino_train.config import ConfigError

    with pytest.raises(ConfigError, match="train.accumulation_steps"):
        modules(accumulation_steps=3)
