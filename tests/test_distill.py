"""Distillation (distill.*): heads rebuilt from their weights alone, the targets taken from the frozen
teacher (not the EMA), a distilled run that resumes bit for bit and is scored by eval_knn, the same on two
gloo ranks, and the teachers that cannot teach refused by key before any step."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from dino_train.config import ConfigError, load_config, plan_run
from dino_train.models.head import DINOHead, head_from_state_dict
from dino_train.runtime import distributed as D
from dino_train.runtime.checksums import with_checksum
from dino_train.runtime.distributed import DistEnv
from dino_train.runtime.files import CheckpointError
from dino_train.train import train
from dino_train.train.build import build_loader, build_modules, build_run_schedules
from dino_train.train.distill import fingerprint
from dino_train.train.sharding import check_fsdp
from dino_train.train.step import StepSettings, train_step
from eval.knn.cli import main as knn_main
from tests.helpers import fork_ranks, tiny_overrides

STUDENT = "model.timm_kwargs={depth: 2}"  # the tiny run's teacher has 12 blocks


@pytest.mark.parametrize(
    "kwargs",
    [dict(nlayers=1), dict(nlayers=2, use_bn=True), dict(nlayers=3, hidden_dim=24, bottleneck_dim=8)],
    ids=["one-layer", "two-layers-bn", "three-layers"],
)
def test_a_head_is_rebuilt_from_its_weights_alone(kwargs):
    torch.manual_seed(0)
    head = DINOHead(12, 40, **kwargs).eval()
    with torch.no_grad():  # BatchNorm statistics away from their init, so that a missed buffer shows
        for buffer in head.buffers():
            if buffer.is_floating_point():
                buffer.add_(torch.rand_like(buffer))
    again = head_from_state_dict(head.state_dict()).eval()
    x = torch.randn(5, 12)
    with torch.no_grad():
        torch.testing.assert_close(again(x), head(x))
    assert again.last_layer.weight_v.shape == (40, kwargs.get("bottleneck_dim", 256))
    with pytest.raises(ValueError, match="no prototype layer"):
        head_from_state_dict({k: v for k, v in head.state_dict().items() if "last_layer" not in k})


@pytest.fixture(scope="module")
def teacher_file(tiny_run, tmp_path_factory):
    """The tiny run's checkpoint (a ViT-Tiny/8 of 12 blocks with its head), copied so it can be changed."""
    path = tmp_path_factory.mktemp("distill") / "teacher.pth"
    shutil.copy(tiny_run[0] / "checkpoint.pth", path)
    return path


def test_the_targets_are_the_frozen_teachers(teacher_file, tiny_data, tmp_path, one_thread):
    """After one step the center is (1 - momentum) times the frozen teacher's mean logit on the two global
    crops, the frozen teacher is unchanged, and the EMA (the student's, a 2-block model) moved."""
    cfg = load_config(None, tiny_overrides(tiny_data, tmp_path, STUDENT, f"distill.teacher={teacher_file}"))
    env, device = DistEnv(), torch.device("cpu")
    loader, sampler = build_loader(cfg.data, 0, env, device)
    mods = build_modules(cfg, env, device, "fp32")
    assert mods.distill_teacher is not None and len(mods.distill_teacher.backbone.blocks) == 12
    assert len(mods.teacher.backbone.blocks) == 2  # the EMA is the student's
    before, ema_before = fingerprint(mods.distill_teacher), fingerprint(mods.teacher)
    crops, _, _ = next(iter(loader))
    with torch.no_grad():
        logits = mods.distill_teacher(crops[:2])
    sched = build_run_schedules(cfg, plan_run(cfg, 1, sampler.batches_per_epoch))
    out = train_step(mods, StepSettings("fp32", device), crops, sched.at(3), 0)  # lr > 0 after warmup began
    assert out.applied
    momentum = cfg.dino.center_momentum
    torch.testing.assert_close(mods.objective.dino.center, (1 - momentum) * logits.mean(0, keepdim=True))
    assert fingerprint(mods.distill_teacher) == before and fingerprint(mods.teacher) != ema_before


@pytest.mark.usefixtures("one_thread")
def test_a_distilled_run_resumes_exactly_and_is_scored(teacher_file, tiny_data, tmp_path):
    distill = (STUDENT, f"distill.teacher={teacher_file}")
    full = train(load_config(None, tiny_overrides(tiny_data, tmp_path / "full", *distill)))
    ckpt = torch.load(tmp_path / "full" / "checkpoint.pth", weights_only=True)
    assert ckpt["distill_teacher"]["path"] == str(teacher_file)
    assert ckpt["distill_teacher"]["arch"] == "vit_tiny"
    assert ckpt["backbone"]["kwargs"]["depth"] == 2  # the checkpoint's model is the student's

    cut = tmp_path / "cut"
    train(load_config(None, tiny_overrides(tiny_data, cut, *distill, "train.max_steps=5")))
    resumed = train(load_config(None, tiny_overrides(tiny_data, cut, *distill)))
    assert resumed.step == full.step == 10
    for a, b in ((full.teacher, resumed.teacher), (full.student, resumed.student)):
        for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert torch.equal(x, y), k

    knn = knn_main(["--checkpoint", str(cut / "checkpoint.pth"), "--data", str(tiny_data), "--ks", "1",
                    "--resize", "32", "--crop", "32", "--num-workers", "0", "--output-dir",
                    str(tmp_path / "knn"), "--no-progress"])  # fmt: skip
    assert knn == 0
    result = json.loads((tmp_path / "knn" / "knn_results.json").read_text())
    assert result["backbone"]["depth"] == 2 and 0 <= result["results"]["1"]["top1"] <= 100

    # The teacher's file changed since: the run is not continued from other targets.
    other = tmp_path / "other.pth"
    sd = torch.load(teacher_file, weights_only=True)
    sd["teacher"]["head.last_layer.weight_v"] = sd["teacher"]["head.last_layer.weight_v"] * 2
    torch.save(with_checksum(sd), other)
    changed = tiny_overrides(tiny_data, cut, STUDENT, f"distill.teacher={other}", "train.epochs=3")
    with pytest.raises(CheckpointError, match="whose weights differ"):
        train(load_config(None, changed))
    # A run of plain DINO is not continued by distillation either.
    with pytest.raises(CheckpointError, match="not written by a distillation run"):
        plain = tmp_path / "plain"
        shutil.copytree(tmp_path / "full", plain)
        for path in plain.glob("checkpoint*.pth"):  # the rolling ones too: resume takes the latest
            ck = torch.load(path, weights_only=True)
            del ck["distill_teacher"]
            torch.save(with_checksum(ck), path)
        train(load_config(None, tiny_overrides(tiny_data, plain, *distill, "train.epochs=3")))


def _rank(rank: int, port: int, overrides: list[str]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_PORT=str(port),
                      MASTER_ADDR="127.0.0.1")  # fmt: skip
    result = train(load_config(None, overrides))
    assert result.step == 3


def test_two_gloo_ranks_distil_with_one_center(teacher_file, tiny_data, tmp_path):
    out = tmp_path / "run"
    over = tiny_overrides(tiny_data, out, STUDENT, f"distill.teacher={teacher_file}", "train.max_steps=3",
                          "train.num_threads=1", "ibot.loss_weight=1")  # fmt: skip
    fork_ranks(_rank, D.free_port(), over, nprocs=2)
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["step"] == 3 and "distill_teacher" in ckpt
    assert torch.isfinite(ckpt["dino_loss"]["center"]).all() and ckpt["dino_loss"]["center"].abs().sum() > 0


def test_teachers_that_cannot_teach_are_refused_by_key(teacher_file, backbone_file, tiny_data, tmp_path):
    def refused(match: str, *extra: str) -> None:
        with pytest.raises(ConfigError, match=match):
            train(load_config(None, tiny_overrides(tiny_data, tmp_path / "r", STUDENT, *extra)))
        assert not (tmp_path / "r" / "checkpoint.pth").exists()

    refused("freeze_backbone_epochs", f"distill.teacher={backbone_file}")  # no DINO head to give targets
    refused(r"set model.out_dim=64", f"distill.teacher={teacher_file}", "model.out_dim=32")
    refused("distill.weights", "distill.teacher=timm:vit_tiny_patch16_224")
    refused(r"distill.teacher: .*does not exist", f"distill.teacher={tmp_path / 'none.pth'}")
    patch16 = ("model.patch_size=16", "data.global_crops_size=32", "data.local_crops_size=16")
    refused("ibot.loss_weight: iBOT compares", f"distill.teacher={teacher_file}", "ibot.loss_weight=1",
            *patch16)  # fmt: skip
    cfg = load_config(None, tiny_overrides(tiny_data, tmp_path, f"distill.teacher={teacher_file}"))
    with pytest.raises(ConfigError, match="distill.teacher"):
        check_fsdp(cfg, "fp32")
