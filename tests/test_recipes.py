"""The recipe sweep (bench.recipes) end to end on the tiny embedded set: two recipes train in their own
processes and are scored on the held-out split at the monitor's size; --resume skips what is done."""

import json
import subprocess

import pytest

from tests.conftest import REPO, python

pytestmark = pytest.mark.slow

# The tiny model of tests/conftest.py as recipe overrides (the sweep sets data.path and output_dir).
TINY = (
    "model.patch_size=8 model.out_dim=64 model.head_hidden_dim=32 model.head_bottleneck_dim=16 "
    "model.use_bn_in_head=false data.batch_size_per_gpu=8 data.num_workers=0 data.local_crops_number=2 "
    "data.local_crops_size=16 optim.warmup_epochs=1 train.epochs=1 train.precision=fp32 "
    "train.log_every_steps=1"
)


def sweep(tiny_data, tmp_path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [python(), "-m", "bench.recipes", "--config", "configs/demo.yaml", "--data", str(tiny_data)]
    cmd += ["--out", str(tmp_path / "runs"), "--json", str(tmp_path / "rows.json"), *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_two_recipes_are_trained_scored_and_resumed(tiny_data, tmp_path):
    # "small" trains on 16 px crops but is scored on the whole 32 px image (monitor.knn_crop), as the
    # long demo trains on 48 px crops of 64 px images.
    small = f"small={TINY} data.global_crops_size=16 data.local_crops_size=8 monitor.knn_crop=32"
    done = sweep(tiny_data, tmp_path, "--recipe", f"base={TINY} data.global_crops_size=32", "--recipe", small)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["name"]: r for r in json.loads((tmp_path / "rows.json").read_text())}
    assert set(rows) == {"random init", "base", "small"}
    for name in ("base", "small"):
        row = rows[name]
        assert "error" not in row, row
        assert row["steps"] == 5  # 40 images, batch 8, one epoch (drop_last)
        assert all(x is not None for x in row["loss"] + row["teacher_entropy_ratio"])
        for key in ("k-NN k=10", "k-NN k=20", "linear probe", "attention Jaccard"):
            assert 0.0 <= row[key] <= 100.0, (name, key, row[key])
    # Both were scored on 32 px images: the sweep prints the scorecard's size line per recipe.
    assert done.stdout.count("resized to 32 px and centre-cropped to 32 px") == 3, done.stdout
    assert "resized to 16 px" not in done.stdout
    assert "small" in done.stdout.splitlines()[-1]  # the table's last row

    again = sweep(tiny_data, tmp_path, "--resume", "--recipe", f"base={TINY}", "--recipe", small)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "== base" not in again.stdout and "== small" not in again.stdout
    assert len(json.loads((tmp_path / "rows.json").read_text())) == 3


def test_a_bad_override_is_a_row_not_a_crash(tiny_data, tmp_path):
    done = sweep(tiny_data, tmp_path, "--recipe", f"bad={TINY} monitor.knn_every_epochs=0")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["name"] for r in rows] == ["random init", "bad"]
    assert all("monitor.knn_every_epochs" in r["error"][-1] for r in rows), rows
