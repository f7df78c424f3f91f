"""eval_finetune end to end on the tiny embedded set: per-epoch JSON, the best weights as a backbone file,
an exact resume after an interruption, a release-format checkpoint, and two processes under torchrun."""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dino_train.models import build_backbone
from dino_train.models.loading import load_backbone
from dino_train.runtime.files import with_prefix
from eval.common import EvalExit
from eval.finetune import cli as finetune_eval
from eval.finetune.model import FineTuneModel, param_groups, set_drop_path
from tests.helpers import ENV, kill_tree

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


_TOKENS = {"cls_token", "reg_token", "dist_token", "pos_embed"}


def _expected(model: FineTuneModel, weight_decay: float, decay: float) -> dict[str, tuple[int, float, float]]:
    """(layer, lr scale, weight decay) of every parameter, worked out by hand from the names: a depth-L
    ViT's tokens and patch embedding are layer 0 at decay ** (L + 1), block i is layer i + 1 at
    decay ** (L - i), the rest (final norm, classifier) layer L + 1 at 1; any other backbone is all
    layer 0 at 1. Weight decay on the parameters of 2 or more dimensions but the tokens."""
    vit = hasattr(model.backbone, "blocks")
    depth = len(model.backbone.blocks) if vit else 0
    out = {}
    for name, param in model.named_parameters():
        parts = name.split(".")
        if not vit:
            layer = 0
        elif parts[1] in _TOKENS or parts[1] == "patch_embed":
            layer = 0
        elif parts[1] == "blocks":
            layer = int(parts[2]) + 1
        else:
            layer = depth + 1
        scale = decay ** (depth + 1 - layer) if vit else 1.0
        exempt = param.ndim == 1 or parts[-1] in _TOKENS
        out[name] = (layer, scale, 0.0 if exempt else weight_decay)
    return out


_SMALL_BACKBONES = {
    "vit": lambda: build_backbone("vit_tiny", patch_size=8, img_size=32, timm_kwargs={"depth": 3}),
    "vit_registers": lambda: build_backbone(
        "vit_tiny", patch_size=8, img_size=32, timm_kwargs={"depth": 3, "reg_tokens": 2}
    ),
    "deit_distilled": lambda: build_backbone(
        "deit_tiny_distilled_patch16_224", img_size=32, timm_kwargs={"depth": 2}
    ),
    # No tokens, and average pooling (an fc_norm after an empty norm): its first parameter is decayed, so
    # timm's groups (in order of first appearance) come in another order than the checkpoints'.
    "vit_no_tokens": lambda: build_backbone(
        "vit_tiny_patch16_384",
        img_size=32,
        timm_kwargs={
            "patch_size": 8,
            "depth": 2,
            "class_token": False,
            "pos_embed": "none",
            "global_pool": "avg",
        },
    ),
    "resnet": lambda: build_backbone("test_resnet"),  # timm's ResNet has a group_matcher: not used
}


@pytest.mark.parametrize("kind", sorted(_SMALL_BACKBONES))
@pytest.mark.parametrize(("weight_decay", "decay"), [(0.05, 0.65), (0.0, 1.0), (0.3, 0.0)])
def test_param_groups_give_every_parameter_its_hand_computed_scale_and_decay(kind, weight_decay, decay):
    model = FineTuneModel(_SMALL_BACKBONES[kind](), 10)
    vit = kind != "resnet"
    assert (type(model.backbone).__name__ == "ReleasePosEmbedViT") == vit
    if kind == "vit_registers":
        assert model.backbone.reg_token is not None
    groups, plan = param_groups(model, weight_decay=weight_decay, layer_decay=decay)
    got = {}
    for group in groups:
        assert len(group["names"]) == len(group["params"])
        for name, param in zip(group["names"], group["params"], strict=True):
            assert param is model.get_parameter(name)
            assert name not in got, f"{name} is in two groups"
            got[name] = (group["lr_scale"], group["weight_decay"])
    expected = _expected(model, weight_decay, decay)
    assert got == {name: (scale, wd) for name, (_, scale, wd) in expected.items()}
    assert plan.per_block == vit and plan.depth == (len(model.backbone.blocks) if vit else 0)
    if not vit:
        assert plan.describe() == "uniform (not a ViT: every layer at the base lr)"


@pytest.mark.parametrize("kind", sorted(_SMALL_BACKBONES))
def test_param_groups_keep_their_order_for_resuming(kind):
    """Optimizer checkpoints map their state to parameters by position: the groups come sorted by (layer,
    decayed), one per pair (whatever the weight decay), parameters within one in named_parameters order
    (the backbone's, then the classifier's joining the top layer's groups), frozen ones left out."""
    model = FineTuneModel(_SMALL_BACKBONES[kind](), 10)
    position = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    expected = _expected(model, 0.05, 0.75)
    keys = sorted({(layer, wd > 0) for layer, _, wd in expected.values()})
    by_key = {k: [n for n in position if (expected[n][0], expected[n][2] > 0) == k] for k in keys}
    groups, _ = param_groups(model, weight_decay=0.05, layer_decay=0.75)
    assert [g["names"] for g in groups] == [by_key[k] for k in keys]
    top = len(model.backbone.blocks) + 1 if kind != "resnet" else 0
    assert groups[-2]["names"][-1] == "head.bias" and groups[-1]["names"][-1] == "head.weight"
    assert keys[-2:] == [(top, False), (top, True)]
    if kind != "resnet":
        assert len(groups) == 2 * (top + 1)  # every layer has a decayed and an exempt group
        norm = "fc_norm" if kind == "vit_no_tokens" else "norm"
        assert groups[-2]["names"][0] == f"backbone.{norm}.weight"
    # The same layout at weight decay 0 and layer decay 1 (timm would merge those groups).
    flat, _ = param_groups(model, weight_decay=0.0, layer_decay=1.0)
    assert [g["names"] for g in flat] == [g["names"] for g in groups]
    assert all(g["weight_decay"] == 0.0 and g["lr_scale"] == 1.0 for g in flat)
    # Frozen parameters drop out without moving the others.
    frozen = {n for n in position if ".0." in n or n.endswith("cls_token")}
    for name in frozen:
        model.get_parameter(name).requires_grad_(False)
    some, _ = param_groups(model, weight_decay=0.05, layer_decay=0.75)
    kept = [[n for n in g["names"] if n not in frozen] for g in groups]
    assert [g["names"] for g in some] == [names for names in kept if names]


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
def test_finetune_writes_results_and_resumes_exactly(tiny_data, backbone_file, tmp_path):
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

    # kill -9 at a random moment after the first epoch's checkpoint: in epoch 1, its save, or epoch 2.
    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        [sys.executable, "-m", "eval.finetune", *_args(backbone_file, tiny_data, cut, *run)],
        cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    epoch_s = _wait_for_first_epoch(cut, proc)
    time.sleep(random.uniform(0, 1.5) * epoch_s)
    kill_tree(proc)
    proc.communicate(timeout=30)
    cut_state = torch.load(cut / "finetune_checkpoint.pth", weights_only=True)  # whole, never half
    assert 1 <= cut_state["epoch"] < 3, f"killed after epoch {cut_state['epoch']}: not mid-run"
    assert finetune_eval.main(_args(backbone_file, tiny_data, cut, *run)) == 0
    full = torch.load(tmp_path / "full" / "finetune_checkpoint.pth", weights_only=True)["model"]
    resumed = torch.load(cut / "finetune_checkpoint.pth", weights_only=True)["model"]
    for k, v in full.items():
        assert torch.equal(resumed[k], v), f"{k} differs after a kill in epoch {cut_state['epoch']}"
    again = json.loads((cut / "finetune_results.json").read_text())
    assert [(r["epoch"], r["top1"]) for r in again["history"]] == [
        (r["epoch"], r["top1"]) for r in res["history"]
    ]
    with pytest.raises(EvalExit, match="other lr"):
        finetune_eval.main(_args(backbone_file, tiny_data, cut, *run, "--lr", "0.01"))


def _wait_for_first_epoch(out: Path, proc: subprocess.Popen, timeout: float = 120) -> float:
    """Wait until the run writing ``out`` has saved its first epoch; return that epoch's seconds."""
    deadline, results = time.time() + timeout, out / "finetune_results.json"
    while not results.exists():
        if proc.poll() is not None or time.time() > deadline:
            kill_tree(proc)
            raise AssertionError(f"fine-tuning did not save an epoch: {proc.communicate()[1][-2000:]}")
        time.sleep(0.02)
    return float(json.loads(results.read_text())["history"][0]["seconds"])


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
