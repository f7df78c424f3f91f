"""End-to-end training runs on the CPU: resume exactness, torchrun, two gloo processes, CLI errors."""

import json

import pytest
import torch

from dino_train.config import load_config
from dino_train.main import main as cli_main
from dino_train.train import train
from tests.helpers import REPO, tiny_overrides, torchrun

# Tiny models: one torch thread in this process (the processes the tests start get one each, too).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def run(data, out, *extra):
    return train(load_config(None, tiny_overrides(data, out, *extra)))


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_stopped_and_resumed_runs_end_with_identical_weights(tiny_run, tiny_data, tmp_path):
    # The uninterrupted run is the shared one (tiny_overrides, one thread); these runs are on one thread too.
    _, full = tiny_run
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


def test_run_outputs_and_checkpoint_layout(tiny_run):
    out, _ = tiny_run  # 2 epochs of 5 steps
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    for key in ("student", "teacher", "optimizer", "epoch", "dino_loss", "config"):
        assert key in ckpt
    assert all(k.startswith("module.backbone.") or k.startswith("module.head.") for k in ckpt["student"])
    assert (
        "head.last_layer.weight_g" in ckpt["teacher"]
        and "backbone.blocks.0.attn.qkv.weight" in ckpt["teacher"]
    )
    assert ckpt["dino_loss"]["center"].shape == (1, 64)
    assert ckpt["epoch"] == 2 and "fp16_scaler" not in ckpt
    backbone = torch.load(out / "teacher_backbone.pth", weights_only=True)
    assert "cls_token" in backbone and not any(k.startswith(("backbone.", "head.")) for k in backbone)
    assert (out / "config.yaml").is_file()
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    lines = [x for x in records if x["kind"] == "step"]
    assert [x["step"] for x in lines] == list(range(1, 11))
    assert [x["skipped_files"] for x in records if x["kind"] == "epoch"] == [0, 0]
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


@pytest.mark.dist
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
def test_cli_errors_name_the_cause_before_compute(tiny_data, tmp_path, extra, key, capsys):
    # main.py's main() in this process: what `python dino_train/main.py` exits with (torchrun runs the
    # script itself in the tests above).
    out = tmp_path / "bad"
    assert cli_main([*tiny_overrides(tiny_data, out), *extra]) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err
    assert not (out / "checkpoint.pth").exists()


@pytest.mark.dist
def test_torchrun_main_end_to_end_then_resume_with_another_world_size(tiny_data, tmp_path):
    # dino_train/main.py under torchrun: 1 process x 8 images for 3 steps (24 samples seen), then 2.
    out = tmp_path / "rescale"
    proc = torchrun(1, "dino_train/main.py", *tiny_overrides(tiny_data, out, "train.max_steps=3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["step"] == 3
    proc = torchrun(2, "dino_train/main.py", *tiny_overrides(tiny_data, out, "train.max_steps=4"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "schedules continue by samples seen, at step 2" in proc.stdout  # 24 / (2 x 8) = 1.5 -> 2
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["step"] == 4 and ckpt["samples_seen"] == 64
