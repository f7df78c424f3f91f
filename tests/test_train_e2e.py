"""End-to-end training runs on the CPU: resume exactness, torchrun, two gloo processes, CLI errors."""

import json
import os
import subprocess
import sys

import pytest
import torch

from dino_train.config import load_config
from dino_train.runtime.distributed import free_port
from dino_train.train import train
from tests.conftest import REPO, tiny_overrides

pytestmark = pytest.mark.slow


def run(data, out, *extra):
    return train(load_config(None, tiny_overrides(data, out, *extra)))


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_stopped_and_resumed_runs_end_with_identical_weights(tiny_data, tmp_path):
    full = run(tiny_data, tmp_path / "full")
    assert full.step == 10 and full.epoch == 2  # 40 images / batch 8 = 5 steps per epoch
    # Stop after one epoch, resume; stop mid-epoch (step 7), resume: workers differ too (0 vs 2).
    first = run(tiny_data, tmp_path / "resumed", "train.max_steps=5")
    assert first.step == 5
    mid = run(tiny_data, tmp_path / "resumed", "train.max_steps=7", "data.num_workers=2")
    assert mid.step == 7
    ckpt = torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"]) == (1, 2, 7)
    resumed = run(tiny_data, tmp_path / "resumed")
    assert resumed.step == 10
    assert_same_state(full.teacher, resumed.teacher)
    assert_same_state(full.student, resumed.student)
    assert torch.equal(full.center, resumed.center)
    assert not torch.equal(full.center, torch.zeros_like(full.center))  # the center did move


def test_run_outputs_and_checkpoint_layout(tiny_data, tmp_path):
    out = tmp_path / "run"
    run(tiny_data, out, "train.epochs=1", "optim.warmup_epochs=0")
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    for key in ("student", "teacher", "optimizer", "epoch", "dino_loss", "config"):
        assert key in ckpt
    assert all(k.startswith("module.backbone.") or k.startswith("module.head.") for k in ckpt["student"])
    assert (
        "head.last_layer.weight_g" in ckpt["teacher"]
        and "backbone.blocks.0.attn.qkv.weight" in ckpt["teacher"]
    )
    assert ckpt["dino_loss"]["center"].shape == (1, 64)
    assert ckpt["epoch"] == 1 and "fp16_scaler" not in ckpt
    backbone = torch.load(out / "teacher_backbone.pth", weights_only=True)
    assert "cls_token" in backbone and not any(k.startswith(("backbone.", "head.")) for k in backbone)
    assert (out / "config.yaml").is_file()
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    lines = [x for x in records if x["kind"] == "step"]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5]
    assert [x["skipped_files"] for x in records if x["kind"] == "epoch"] == [0]
    assert all(x["loss"] > 0 and x["images_per_s"] > 0 for x in lines)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_frozen_last_layer_does_not_move_in_first_epoch(tiny_data, tmp_path):
    from dino_train.models import build_student_teacher
    from dino_train.train.build import position_grid_size

    extra = ("train.max_steps=3", "model.norm_last_layer=false")
    res = run(tiny_data, tmp_path / "r", *extra)
    cfg = load_config(None, tiny_overrides(tiny_data, tmp_path / "r", *extra))
    torch.manual_seed(cfg.train.seed)  # the run's seed and shapes: the same initial weights
    s, _ = build_student_teacher(cfg.model, position_grid_size(cfg), cfg.ibot)
    for name in ("weight_v", "weight_g"):
        assert torch.equal(getattr(s.head.last_layer, name), getattr(res.student.head.last_layer, name))
    assert not torch.equal(s.head.mlp[0].weight, res.student.head.mlp[0].weight)


def torchrun(nproc, *args, timeout=300):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_torchrun_main_end_to_end(tiny_data, tmp_path):
    out = tmp_path / "tr"
    proc = torchrun(1, "dino_train/main.py", *tiny_overrides(tiny_data, out, "train.max_steps=3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["step"] == 3


def test_two_gloo_processes_agree_on_teacher_and_center(tiny_data, tmp_path):
    out = tmp_path / "ddp"
    script = REPO / "tests" / "rank_dump.py"
    proc = torchrun(2, str(script), str(out), *tiny_overrides(tiny_data, out, "train.max_steps=3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert torch.equal(r0["center"], r1["center"])
    for k in r0["teacher"]:
        assert torch.equal(r0["teacher"][k], r1["teacher"][k]), k
    # Each rank saw its own half of the batch, yet the center is the mean over both.
    assert not torch.equal(r0["center"], torch.zeros_like(r0["center"]))
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["world_size"] == 2 and torch.equal(ckpt["dino_loss"]["center"], r0["center"])


@pytest.mark.parametrize(
    "extra, key",
    [
        (["optim.lr=-1"], "optim.lr"),
        (["train.precision=fp16", "train.device=cpu"], "train.precision"),
        (["data.path=/does/not/exist"], "/does/not/exist"),
        (["model.patch_size=7"], "data.global_crops_size"),
    ],
)
def test_cli_errors_name_the_cause_before_compute(tiny_data, tmp_path, extra, key):
    out = tmp_path / "bad"
    cmd = [sys.executable, "dino_train/main.py", *tiny_overrides(tiny_data, out), *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert key in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "checkpoint.pth").exists()


def test_resume_with_another_world_size_continues_by_samples_seen(tiny_data, tmp_path):
    out = tmp_path / "rescale"
    first = run(tiny_data, out, "train.max_steps=3")  # 1 process x 8 images: 24 samples seen
    assert first.step == 3
    proc = torchrun(2, "dino_train/main.py", *tiny_overrides(tiny_data, out, "train.max_steps=4"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "schedules continue by samples seen, at step 2" in proc.stdout  # 24 / (2 x 8) = 1.5 -> 2
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["step"] == 4 and ckpt["samples_seen"] == 64
