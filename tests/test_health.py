"""Collapse telemetry against hand computations, TensorBoard read back over HTTP, the report (the detector:
tests/test_collapse_warning.py)."""

import json
import math
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
import torch

from dino_train.config import load_config
from dino_train.core.metrics import dino_metrics, feature_std
from dino_train.data.embedded import SHAPE_CLASSES
from dino_train.measure.jaccard import folder_jaccard
from dino_train.models import build_backbone
from dino_train.models.loading import load_backbone
from dino_train.monitor.logger import Monitor
from dino_train.monitor.periodic import PeriodicJaccard
from dino_train.monitor.report import main as report_main
from dino_train.monitor.report import read_log, summarize
from dino_train.runtime.distributed import free_port
from dino_train.train import train
from tests.helpers import tiny_overrides


def test_uniform_teacher_metrics():
    k, b = 8, 3
    m = dino_metrics(torch.zeros(4 * b, k), torch.zeros(2 * b, k), torch.zeros(1, k), 0.04, 0.1)
    assert m["teacher_entropy"].item() == pytest.approx(math.log(k), rel=1e-6)
    assert m["teacher_entropy_ratio"].item() == pytest.approx(1.0, rel=1e-6)
    assert m["batch_entropy_ratio"].item() == pytest.approx(1.0, rel=1e-6)
    assert m["teacher_information"].item() == pytest.approx(0.0, abs=1e-6)
    assert m["kl_teacher_student"].item() == pytest.approx(0.0, abs=1e-6)  # both uniform
    assert m["center_norm"].item() == 0.0


def test_one_prototype_teacher_metrics():
    k, b = 8, 4
    teacher = torch.zeros(2 * b, k)
    teacher[:, 3] = 100.0
    m = dino_metrics(torch.zeros(2 * b, k), teacher, torch.ones(1, k), 0.04, 0.1)
    assert m["teacher_entropy_ratio"].item() < 1e-6
    assert m["batch_entropy_ratio"].item() < 1e-6
    assert m["prototypes_in_use"].item() == 1
    assert m["teacher_information"].item() == pytest.approx(0.0, abs=1e-5)
    # KL(one-hot || uniform student) = log K.
    assert m["kl_teacher_student"].item() == pytest.approx(math.log(k), rel=1e-5)
    assert m["center_norm"].item() == pytest.approx(math.sqrt(k))


def test_information_of_a_flat_but_image_dependent_teacher():
    # Four crops, K=4: crop i puts logit 0.04 on prototype i (p = e/(e+3) there, 1/(e+3) elsewhere at
    # temperature 0.04). Each distribution is nearly flat, but the batch mean is exactly uniform.
    k = 4
    teacher = torch.eye(k) * 0.04
    m = dino_metrics(torch.zeros(2 * 2, k), teacher, torch.zeros(1, k), 0.04, 0.1)
    hi, lo = math.e / (math.e + 3), 1 / (math.e + 3)
    entropy = -(hi * math.log(hi) + 3 * lo * math.log(lo))
    assert m["teacher_entropy"].item() == pytest.approx(entropy, rel=1e-5)
    assert m["batch_entropy_ratio"].item() == pytest.approx(1.0, rel=1e-5)
    assert m["teacher_information"].item() == pytest.approx(math.log(k) - entropy, rel=1e-4)


def test_kl_pairs_views_like_the_loss():
    # B=1, K=2: teacher view 1 is compared with student view 2 and vice versa.
    teacher = torch.tensor([[0.0, 0.0], [0.0, 0.0]])  # q = (.5, .5) for both views
    student = torch.tensor([[0.0, 0.0], [math.log(3) * 0.1, 0.0]])  # view 2: p = (.75, .25)
    m = dino_metrics(student, teacher, torch.zeros(1, 2), 0.04, 0.1)
    kl_view2 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert m["kl_teacher_student"].item() == pytest.approx(kl_view2 / 2, rel=1e-5)


def test_feature_std():
    assert feature_std(torch.ones(10, 4)).item() == pytest.approx(0.0, abs=1e-7)
    eye = torch.eye(4)
    assert feature_std(eye).item() == pytest.approx(0.5, rel=1e-5)  # each column (1,0,0,0): std 0.5


def get_json(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def healthy_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("health") / "run"
    threads = torch.get_num_threads()
    result = train(
        load_config(
            None,
            tiny_overrides(
                tiny_data,
                out,
                "train.epochs=3",
                f"monitor.knn_data={tiny_data}",
                "monitor.knn_ks=[5,10]",
                f"monitor.attention_images={tiny_data / 'val'}",
                "monitor.attention_every_epochs=2",
                "train.num_threads=1",  # a tiny model; the thread count is set back below
            ),
        )
    )
    torch.set_num_threads(threads)
    return out, result


@pytest.mark.slow
def test_healthy_run_logs_metrics_knn_and_no_warning(healthy_run):
    out, result = healthy_run
    assert result.warnings == []
    steps = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if '"kind": "step"' in x]
    for key in (
        "teacher_entropy_ratio",
        "batch_entropy_ratio",
        "teacher_information",
        "prototypes_in_use",
        "kl_teacher_student",
        "center_norm",
        "student_feature_std",
        "teacher_feature_std",
        "grad_norm_backbone",
        "grad_norm_head",
    ):
        assert all(r[key] is not None for r in steps), key
    assert all(0 <= r["teacher_entropy_ratio"] <= 1 for r in steps)
    knn = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if '"kind": "knn"' in x]
    assert [r["epoch"] for r in knn] == [0, 1, 2] and all(0 <= r["knn_top1_k5"] <= 100 for r in knn)


@pytest.mark.slow
def test_the_monitor_logs_the_attention_jaccard_of_the_teacher(healthy_run, tiny_data):
    """knn_data has val_masks/: each k-NN epoch also logs the Jaccard, and the last one is what
    eval_attention's measure gives for the saved teacher at the monitor's size (32 px here)."""
    out, _ = healthy_run
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if '"kind": "jaccard"' in x]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert all(r["images"] == 2 * len(SHAPE_CLASSES) and len(r["per_head"]) == 3 for r in rows)
    teacher, _ = load_backbone(out / "checkpoint.pth")
    expected = folder_jaccard(teacher.eval(), tiny_data / "val", tiny_data / "val_masks", image_size=32)
    assert rows[-1]["best_head_per_object"] == pytest.approx(expected.best_head_per_object, abs=1e-4)
    assert rows[-1]["head_mean_mask"] == pytest.approx(expected.head_mean_mask, abs=1e-4)
    assert rows[-1]["per_head"] == pytest.approx(expected.per_head, abs=1e-4)
    assert rows[-1]["references"] == pytest.approx(expected.references)  # the same masks, no model
    assert rows[-1]["by_brightness"] == pytest.approx(expected.by_brightness(), abs=1e-4)
    last = summarize(read_log(out))["last_jaccard"]
    assert last["references"] == rows[-1]["references"]
    assert last["value"] == rows[-1]["best_head_per_object"] and "the paper's rule" in last["rule"]


def test_the_jaccard_hook_needs_masks_and_a_vit(tiny_data, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny_data, tmp_path / "run", f"monitor.knn_data={tiny_data}"))
    monitor = Monitor(tmp_path, enabled=False, total_steps=1)
    vit = build_backbone("vit_tiny", 8, 32)
    hook = PeriodicJaccard.for_run(cfg, monitor, vit)
    assert hook is not None and len(hook.images) == len(hook.masks) == 2 * len(SHAPE_CLASSES)
    assert hook.images[0].shape == (1, 3, 32, 32) and hook.masks[0].shape == (32, 32)
    assert PeriodicJaccard.for_run(cfg, monitor, build_backbone("resnet18", 16, 32)) is None
    no_masks = tmp_path / "plain"
    for split in ("train", "val"):
        shutil.copytree(tiny_data / split, no_masks / split)
    plain = load_config(None, tiny_overrides(tiny_data, tmp_path / "run", f"monitor.knn_data={no_masks}"))
    assert PeriodicJaccard.for_run(plain, monitor, vit) is None


@pytest.mark.slow
def test_tensorboard_serves_the_scalars(healthy_run):
    out, _ = healthy_run
    port = free_port()
    tb = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(out / "tensorboard"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--load_fast=false",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        tags, deadline = {}, time.time() + 60
        while time.time() < deadline:
            try:
                tags = get_json(f"{base}/data/plugin/scalars/tags")
                if tags and any("health/teacher_entropy_ratio" in t for t in tags.values()):
                    break
            except (TimeoutError, OSError, ValueError):
                pass
            time.sleep(0.5)
        run, run_tags = next(iter(tags.items()))
        for tag in (
            "loss/loss",
            "schedule/lr",
            "schedule/teacher_temp",
            "health/teacher_entropy_ratio",
            "grad/grad_norm_head",
            "speed/images_per_s",
            "knn/knn_top1_k5",
            "attention/jaccard_best_head_per_object",
            "attention/jaccard_head_mean_mask",
            "attention/jaccard_head0",
            "attention/jaccard_object_brighter",
            "attention/jaccard_object_darker",
        ):
            assert tag in run_tags, tag
        images = get_json(f"{base}/data/plugin/images/tags")
        assert {"attention/0", "attention/3"} <= set(images[run])  # the fixed images' attention maps
        query = urllib.parse.urlencode({"tag": "loss/loss", "run": run})
        points = get_json(f"{base}/data/plugin/scalars/scalars?{query}")
        logged = [
            json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if '"kind": "step"' in x
        ]
        assert [p[1] for p in points] == [r["step"] for r in logged]
        assert [p[2] for p in points] == pytest.approx([r["loss"] for r in logged], rel=1e-6)
    finally:
        tb.terminate()
        tb.wait(timeout=30)


@pytest.mark.slow
def test_report_from_a_real_run(healthy_run, capsys, tmp_path):
    out, _ = healthy_run
    assert report_main([str(out)]) == 0
    text = capsys.readouterr().out
    assert "steps:          15" in text and "best k-NN:" in text and "warnings:       0" in text
    assert "attention Jaccard: " in text
    assert "(best head per object, the paper's rule, epoch 2 (3 completed))" in text
    assert "without a model, by the paper's rule: " in text and "for the other masks' mean" in text
    png = out / "report.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert report_main([str(out / "nope")]) == 2
    # A log written before the references existed still reports (no references line).
    old = tmp_path / "old"
    old.mkdir()
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    for r in rows:  # as logged before the references and the paper's rule: the head-mean mask as "mean"
        r.pop("references", None)
        if r["kind"] == "jaccard":
            r["mean"] = r.pop("head_mean_mask")
            del r["best_head_per_object"]
    (old / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert report_main([str(old)]) == 0
    text = capsys.readouterr().out
    assert "attention Jaccard: " in text and "without a model" not in text
    assert "(head-mean mask, logged before the paper's rule, epoch 2 (3 completed))" in text
