"""eval_finetune end to end on the tiny embedded set: per-epoch JSON, the best weights as a backbone file,
an exact resume after an interruption, a release-format checkpoint, and two processes under torchrun."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dino_train.models import build_backbone
from dino_train.models.loading import load_backbone
from dino_train.runtime.files import with_prefix
from eval.common import EvalExit
from eval.finetune import cli as finetune_eval
from eval.finetune import runner
from eval.finetune.model import FineTuneModel, param_groups, set_drop_path

REPO = Path(__file__).resolve().parents[1]
FAST = ["--crop", "32", "--resize", "32", "--batch-size", "8", "--num-workers", "0", "--device", "cpu",
        "--no-progress", "--precision", "fp32", "--warmup-epochs", "1", "--lr", "1e-3"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(ckpt: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(ckpt), "--data", str(data), "--output-dir", str(out), *FAST, *extra]


def test_layer_decay_groups_and_drop_path():
    model = FineTuneModel(build_backbone("vit_tiny", patch_size=8, img_size=32), 10)
    assert set_drop_path(model.backbone, 0.1)
    assert model.backbone.blocks[0].drop_path1.__class__.__name__ == "Identity"
    assert model.backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    groups, plan = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    scale = {name: g["lr_scale"] for g in groups for name in g["names"]}
    decay = {name: g["weight_decay"] for g in groups for name in g["names"]}
    assert scale["head.weight"] == 1.0 and scale["backbone.norm.weight"] == 1.0
    assert scale["backbone.blocks.11.attn.qkv.weight"] == 0.5
    assert scale["backbone.blocks.0.attn.qkv.weight"] == 0.5**12
    assert scale["backbone.pos_embed"] == scale["backbone.patch_embed.proj.weight"] == 0.5**13
    assert decay["backbone.blocks.3.mlp.fc1.weight"] == 0.05 and decay["head.weight"] == 0.05
    assert (
        decay["backbone.blocks.3.mlp.fc1.bias"]
        == decay["backbone.pos_embed"]
        == decay["backbone.cls_token"]
        == 0
    )
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert plan.per_block and "per block" in plan.describe()


def test_randaugment_specs_that_would_crash_are_refused_up_front(tmp_path):
    from eval.finetune.train import check_randaugment, train_transform

    train_transform(32, "rand-m9-mstd0.5-inc1-mmax9", 0.25)  # the default
    train_transform(32, "none", 0.0)
    with pytest.raises(ValueError, match="add -mmax9"):
        check_randaugment("rand-m9-mstd0.5-inc1")  # DeiT's spelling: posterize reaches 0 bits at m=10
    with pytest.raises(ValueError, match="expected 'none'"):
        check_randaugment("autoaug")
    with pytest.raises(EvalExit, match="add -mmax9"):
        finetune_eval.main(
            _args(tmp_path / "no.pth", tmp_path, tmp_path / "out", "--randaugment", "rand-m9-inc1-m10")
        )


@pytest.mark.slow
def test_finetune_writes_results_and_resumes_exactly(tiny_data, backbone_file, tmp_path, monkeypatch):
    run = ["--epochs", "3"]
    assert finetune_eval.main(_args(backbone_file, tiny_data, tmp_path / "full", *run)) == 0
    res = json.loads((tmp_path / "full" / "finetune_results.json").read_text())
    assert [r["epoch"] for r in res["history"]] == [0, 1, 2] and res["epochs_completed"] == 3
    assert all(0 <= r["top1"] <= r["top5"] <= 100 and r["train_loss"] > 0 for r in res["history"])
    assert res["best"]["top1"] == max(r["top1"] for r in res["history"]) and res["last"] == res["history"][-1]
    s = res["settings"]
    assert (s["resize"], s["crop"], s["epochs"], s["lr"], s["world_size"]) == (32, 32, 3, 1e-3, 1)
    assert s["lr_scaled"] == pytest.approx(1e-3 * 8 / 256) and s["checkpoint"] == str(backbone_file)
    assert res["backbone"]["arch"] == "vit_tiny" and (tmp_path / "full" / "tensorboard").is_dir()
    # The best weights load back as a backbone (the fine-tuned one, not the pretrained one).
    tuned, info = load_backbone(tmp_path / "full" / "finetune_best.pth", "model")
    pretrained, _ = load_backbone(backbone_file)
    assert info["epoch"] == res["best"]["epoch"] + 1  # files count epochs completed
    assert not torch.equal(tuned.blocks[-1].mlp.fc2.weight, pretrained.blocks[-1].mlp.fc2.weight)

    calls, real = [], runner.train_one_epoch

    def preempted_in_epoch_two(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("preempted")
        return real(*a, **k)

    monkeypatch.setattr(runner, "train_one_epoch", preempted_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        finetune_eval.main(_args(backbone_file, tiny_data, tmp_path / "cut", *run))
    cut_state = torch.load(tmp_path / "cut" / "finetune_checkpoint.pth", weights_only=True)
    assert cut_state["epoch"] == 1
    monkeypatch.setattr(runner, "train_one_epoch", real)
    assert finetune_eval.main(_args(backbone_file, tiny_data, tmp_path / "cut", *run)) == 0
    full = torch.load(tmp_path / "full" / "finetune_checkpoint.pth", weights_only=True)["model"]
    cut = torch.load(tmp_path / "cut" / "finetune_checkpoint.pth", weights_only=True)["model"]
    for k, v in full.items():
        torch.testing.assert_close(cut[k], v, msg=k)
    again = json.loads((tmp_path / "cut" / "finetune_results.json").read_text())
    assert [(r["epoch"], r["top1"]) for r in again["history"]] == [
        (r["epoch"], r["top1"]) for r in res["history"]
    ]
    with pytest.raises(EvalExit, match="other lr"):
        finetune_eval.main(_args(backbone_file, tiny_data, tmp_path / "cut", *run, "--lr", "0.01"))


def _release_checkpoint(path: Path) -> torch.nn.Module:
    """The original release's full checkpoint layout: teacher ``backbone.*`` + ``head.*`` with a
    weight-normed last layer, student under ``module.``, a pickled argparse namespace."""
    torch.manual_seed(5)
    vit = build_backbone("vit_tiny", patch_size=8, img_size=32)
    head = {"mlp.0.weight": torch.randn(32, 192), "mlp.0.bias": torch.zeros(32),
            "last_layer.weight_g": torch.ones(64, 1), "last_layer.weight_v": torch.randn(64, 32)}  # fmt: skip
    torch.save(
        {
            "teacher": with_prefix(vit.state_dict(), "backbone.") | with_prefix(head, "head."),
            "student": with_prefix(vit.state_dict(), "module.backbone.") | with_prefix(head, "module.head."),
            "optimizer": {"state": {}, "param_groups": []},
            "epoch": 3,
            "args": argparse.Namespace(arch="vit_tiny", patch_size=8, lr=0.0005),
            "dino_loss": {"center": torch.zeros(1, 64)},
        },
        path,
    )
    return vit


@pytest.mark.slow
def test_finetune_takes_a_release_format_checkpoint(tiny_data, tmp_path):
    _release_checkpoint(tmp_path / "checkpoint.pth")
    out = tmp_path / "ft"
    assert finetune_eval.main(_args(tmp_path / "checkpoint.pth", tiny_data, out, "--epochs", "1")) == 0
    res = json.loads((out / "finetune_results.json").read_text())
    b = res["backbone"]
    assert (b["source"], b["epochs_completed"], b["epoch"]) == ("release-checkpoint", 3, 2)
    assert b["arch"] == "vit_tiny" and len(res["history"]) == 1


@pytest.mark.slow
@pytest.mark.dist
def test_finetune_under_torchrun_agrees_with_its_checkpoint(tiny_data, backbone_file, tmp_path):
    out = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "eval.finetune", *_args(backbone_file, tiny_data, out, "--epochs", "1")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "finetune_results.json").read_text())
    assert (res["settings"]["world_size"], res["settings"]["total_batch"]) == (2, 16)
    # The two ranks' shards of val were gathered: one process scoring the saved model gets the same.
    from dino_train.data import eval_transform
    from dino_train.data.labelled import class_folders
    from eval.finetune.train import validate

    state = torch.load(out / "finetune_checkpoint.pth", weights_only=True)
    model = FineTuneModel(build_backbone("vit_tiny", patch_size=8, img_size=32), 10)
    model.load_state_dict(state["model"])
    tf = eval_transform(32, 32)
    data = class_folders(tiny_data / "train", tiny_data / "val", tf, tf)
    acc = validate(model, data.val, lambda y: data.remap(data.val, y), 8, 0, torch.device("cpu"), "fp32")
    assert acc["top1"] == pytest.approx(res["last"]["top1"]) and acc["top5"] == pytest.approx(
        res["last"]["top5"]
    )
