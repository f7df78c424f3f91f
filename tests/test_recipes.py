"""The recipe sweep (bench.recipes) end to end on the tiny embedded set: two recipes train in their own
processes and are scored on the held-out split at the monitor's size; --resume skips what is done."""

import json

import pytest

from bench.recipes import main as recipes_main
from eval.scorecard import JACCARD, JACCARD_HEAD_MEAN
from tests.helpers import REPO

pytestmark = pytest.mark.slow

# The tiny model of tests/conftest.py as recipe overrides (the sweep sets data.path and output_dir).
TINY = (
    "model.patch_size=8 model.out_dim=64 model.head_hidden_dim=32 model.head_bottleneck_dim=16 "
    "model.use_bn_in_head=false data.batch_size_per_gpu=8 data.num_workers=0 data.local_crops_number=2 "
    "data.local_crops_size=16 optim.warmup_epochs=1 train.epochs=1 train.precision=fp32 "
    "train.log_every_steps=1"
)


@pytest.fixture
def sweep(monkeypatch, capsys, one_thread):
    """bench.recipes' main() in this process, from the repository root as ``python -m bench.recipes``
    runs (each recipe still trains in a child process of its own; the scoring happens here): a function
    of the extra arguments that returns the printed output."""
    monkeypatch.chdir(REPO)

    def run(tiny_data, tmp_path, *extra: str) -> str:
        args = ["--config", "configs/demo.yaml", "--data", str(tiny_data), "--out", str(tmp_path / "runs")]
        assert recipes_main([*args, "--json", str(tmp_path / "rows.json"), *extra]) == 0
        return capsys.readouterr().out

    return run


def test_two_recipes_are_trained_scored_and_resumed(sweep, tiny_data, tmp_path):
    # "small" trains on 16 px crops but is scored on the whole 32 px image (monitor.knn_crop), as the
    # long demo trains on 48 px crops of 64 px images.
    small = f"small={TINY} data.global_crops_size=16 data.local_crops_size=8 monitor.knn_crop=32"
    base = f"base={TINY} data.global_crops_size=32 monitor.knn_crop=32"
    stdout = sweep(tiny_data, tmp_path, "--recipe", base, "--recipe", small)
    rows = {r["name"]: r for r in json.loads((tmp_path / "rows.json").read_text())}
    assert set(rows) == {"random init", "base", "small"}
    for name in ("base", "small"):
        row = rows[name]
        assert "error" not in row, row
        assert row["steps"] == 5  # 40 images, batch 8, one epoch (drop_last)
        assert all(x is not None for x in row["loss"] + row["teacher_entropy_ratio"])
        for key in ("k-NN k=10", "k-NN k=20", "linear probe", JACCARD, JACCARD_HEAD_MEAN):
            assert 0.0 <= row[key] <= 100.0, (name, key, row[key])
    # Both were scored on 32 px images: the sweep prints the scorecard's size line per recipe.
    assert stdout.count("resized to 32 px and centre-cropped to 32 px") == 3, stdout
    assert "resized to 16 px" not in stdout
    assert "small" in stdout.splitlines()[-1]  # the table's last row

    again = sweep(tiny_data, tmp_path, "--resume", "--recipe", f"base={TINY}", "--recipe", small)
    assert "== base" not in again and "== small" not in again
    assert len(json.loads((tmp_path / "rows.json").read_text())) == 3


def test_a_bad_override_is_a_row_not_a_crash(sweep, tiny_data, tmp_path):
    sweep(tiny_data, tmp_path, "--recipe", f"bad={TINY} monitor.knn_every_epochs=0")
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["name"] for r in rows] == ["random init", "bad"]
    assert all("monitor.knn_every_epochs" in r["error"][-1] for r in rows), rows
