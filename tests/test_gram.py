"""Gram anchoring (gram.*): the loss against hand-computed values, the grid resize, the snapshot
schedule, a run whose log shows the term from its start step on, an exact resume with the Gram teacher
in the checkpoint, and the configurations refused by key."""

from __future__ import annotations

import json

import pytest
import torch

from dino_train.config import ConfigError, GramConfig, load_config
from dino_train.core.gram import gram_loss, gram_matrix, resize_patch_grid
from dino_train.models import build_backbone
from dino_train.train import train
from dino_train.train.gram import GramTeacher
from dino_train.train.sharding import check_fsdp
from tests.helpers import tiny_overrides

GRAM = ("gram.weight=1", "gram.start_step=3", "gram.refresh_every=4", "gram.teacher_scale=2")


def test_gram_loss_by_hand():
    # Student patches orthogonal (Gram = I), teacher patches parallel (Gram = all ones): the two
    # matrices differ by 1 in the two off-diagonal entries of four, so the mean square is 2 / 4.
    student = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]], requires_grad=True)
    teacher = torch.tensor([[[1.0, 0.0], [5.0, 0.0]]])
    torch.testing.assert_close(gram_matrix(student), torch.eye(2)[None])
    loss = gram_loss(student, teacher)
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    # Norms do not matter (each row is normalised), and equal directions give zero.
    assert gram_loss(teacher * 7, teacher).item() == pytest.approx(0.0, abs=1e-7)
    # One image of two: the other image's zero distance halves the mean.
    two = gram_loss(torch.cat([student.detach(), teacher]), torch.cat([teacher, teacher]))
    assert two.item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="differ in images or patches"):
        gram_loss(torch.zeros(1, 4, 2), torch.zeros(1, 3, 2))


def test_resize_patch_grid():
    flat = torch.full((2, 16, 3), 0.5)
    torch.testing.assert_close(resize_patch_grid(flat, (4, 4), (2, 2)), torch.full((2, 4, 3), 0.5))
    x = torch.randn(1, 6, 5)
    assert resize_patch_grid(x, (2, 3), (2, 3)) is x
    ramp = torch.arange(4.0).repeat(4).view(1, 16, 1)  # columns 0..3 on a 4 x 4 grid
    down = resize_patch_grid(ramp, (4, 4), (4, 2)).view(4, 2)
    assert (down[:, 0] < down[:, 1]).all()  # the left half stays left
    with pytest.raises(ValueError, match="do not fill"):
        resize_patch_grid(torch.zeros(1, 15, 2), (4, 4), (2, 2))


def test_snapshots_at_start_then_every_refresh():
    vit = build_backbone("vit_tiny", patch_size=8, img_size=32)
    gram = GramTeacher(GramConfig(weight=1, start_step=3, refresh_every=4), vit)
    taken = [s for s in range(16) if gram.before_step(s, vit)]
    assert taken == [3, 7, 11, 15] and gram.taken_at == 15
    once = GramTeacher(GramConfig(weight=1, start_step=2), vit)
    assert [s for s in range(16) if once.before_step(s, vit)] == [2]
    # The snapshot is a copy: changing the teacher afterwards does not change it.
    with torch.no_grad():
        vit.blocks[0].attn.qkv.weight.add_(1.0)
    assert not torch.equal(once.backbone.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    # Twice the resolution, brought back to the student's grid: 32 px crops of /8 patches, 4 x 4.
    high = GramTeacher(GramConfig(weight=1, teacher_scale=2), vit)
    assert high.targets(torch.randn(3, 3, 32, 32)).shape == (3, 16, vit.embed_dim)


@pytest.mark.usefixtures("one_thread")
def test_a_run_anchors_from_its_start_step_and_resumes_exactly(tiny_data, tmp_path):
    full = train(load_config(None, tiny_overrides(tiny_data, tmp_path / "full", *GRAM)))
    logged = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    gram_steps = [r["step"] for r in logged if "loss_gram" in r]
    loss_steps = [r["step"] for r in logged if "loss" in r]
    # Step numbers in the log count finished steps: the snapshot before the 4th step (start_step=3).
    assert gram_steps == [s for s in loss_steps if s >= 4] and gram_steps[0] == 4
    assert all(r["loss_gram"] > 0 for r in logged if "loss_gram" in r)
    ckpt = torch.load(tmp_path / "full" / "checkpoint.pth", weights_only=True)
    assert ckpt["gram_teacher"]["taken_at"] == 7  # 3, then 7; 11 is past the end

    cut = tmp_path / "cut"
    train(load_config(None, tiny_overrides(tiny_data, cut, *GRAM, "train.max_steps=5")))
    resumed = train(load_config(None, tiny_overrides(tiny_data, cut, *GRAM)))
    assert resumed.step == full.step == 10
    for a, b in ((full.teacher, resumed.teacher), (full.student, resumed.student)):
        for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert torch.equal(x, y), k
    again = torch.load(cut / "checkpoint.pth", weights_only=True)["gram_teacher"]
    for k, v in ckpt["gram_teacher"]["backbone"].items():
        assert torch.equal(v, again["backbone"][k]), k


def test_what_gram_anchoring_cannot_do_is_refused(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="gram.weight: needs a ViT's patch tokens"):
        load_config(None, tiny_overrides(tiny_data, tmp_path, "model.arch=resnet18", "gram.weight=1"))
    cfg = load_config(None, tiny_overrides(tiny_data, tmp_path, "train.sharding=fsdp", "gram.weight=1"))
    with pytest.raises(ConfigError, match="gram.weight"):
        check_fsdp(cfg, "fp32")
    with pytest.raises(ConfigError, match="gram.teacher_scale"):
        load_config(None, tiny_overrides(tiny_data, tmp_path, "gram.teacher_scale=0.5"))
