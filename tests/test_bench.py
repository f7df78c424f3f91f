"""The benchmarks' own measuring: CPU step memory accounting, the train-step table's comparisons and its
rounds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.train_step import main as train_step_main
from tests.helpers import REPO


@pytest.fixture
def bench_here(monkeypatch, one_thread):
    """bench.train_step's main() in this process, as ``python -m bench.train_step`` runs it from the
    repository root: its rows' child processes start there (bench/ is not installed), and the torch
    threads it sets (--threads) are restored afterwards."""
    monkeypatch.chdir(REPO)


def _python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.slow
def test_cpu_step_memory_sees_a_known_peak_and_not_what_was_held_before():
    # A fresh interpreter: exact accounting changes this process's allocator for good.
    out = _python(
        "import torch\n"
        "from bench.memory import measure_step_memory\n"
        "held = torch.ones(32 * 2**20 // 4)  # 32 MiB held before the step: not part of its peak\n"
        "def step():\n"
        "    a = torch.ones(48 * 2**20 // 4)\n"
        "    b = a * 2  # 96 MiB live at once\n"
        "    del a, b\n"
        "    c = torch.ones(16 * 2**20 // 4)  # freed memory came back: the peak stays at 96\n"
        "    return c.sum()\n"
        "print(measure_step_memory(step, torch.device('cpu'))[0])\n"
    )
    peak = float(out.strip().splitlines()[-1])
    assert 90 <= peak <= 110, peak


@pytest.mark.slow
def test_train_step_bench_rows_compare_with_explicit_attention_and_the_reference(tmp_path, bench_here, capfd):
    out = tmp_path / "step.json"
    argv = [
        "--arch", "vit_tiny", "--patch", "16", "--batch", "2",
        "--global-size", "32", "--local-size", "16", "--local-crops", "2", "--out-dim", "256",
        "--precision", "fp32", "--attention", "fused", "explicit", "--steps", "1", "--threads", "1",
        "--rounds", "2", "--json", str(out),
    ]  # fmt: skip
    assert train_step_main(argv) == 0  # each row's rounds in a child process of its own
    stdout = capfd.readouterr().out
    assert "mem x" in stdout and "vs ref" in stdout
    assert stdout.count("  rounds: ") == 2  # one line per row, each round's times
    data = json.loads(out.read_text())
    assert data["meta"]["isolated"] is True and data["meta"]["rounds"] == 2
    assert all(len(r["step_s_rounds"]) == 2 and r["step_s"] in r["step_s_rounds"] for r in data["rows"])
    rows = {r["attention"]: r for r in data["rows"]}
    assert set(rows) == {"fused", "explicit"}
    # The explicit fp32 eager row is the reference for both comparisons.
    assert rows["explicit"]["mem_vs_explicit"] == 1.0 and rows["explicit"]["speedup_vs_ref"] == 1.0
    fused = rows["fused"]
    assert fused["speedup_vs_ref"] == rows["explicit"]["step_s"] / fused["step_s"]
    for r in rows.values():
        assert r["step_s"] > 0 and r["gflop_per_step"] > 0 and r["step_peak_mib"] > 0
        assert 0 < r["mfu"] < 1.5


@pytest.mark.slow
def test_train_step_bench_through_the_loader_takes_the_pil_row_as_the_reference(
    tmp_path, tiny_data, bench_here, capfd
):
    """--augment auto pil: the same fp32 explicit step through the loader on both augmentation paths; the
    release's PIL path is the reference of the whole loop."""
    out = tmp_path / "loop.json"
    argv = [
        "--arch", "vit_tiny", "--patch", "16", "--batch", "4",
        "--global-size", "32", "--local-size", "16", "--local-crops", "2", "--out-dim", "256",
        "--precision", "fp32", "--attention", "explicit", "--augment", "auto", "pil", "--steps", "2",
        "--threads", "1", "--data", str(tiny_data / "train"), "--workers", "0", "--json", str(out),
    ]  # fmt: skip
    assert train_step_main(argv) == 0
    stdout = capfd.readouterr().out
    rows = {r["augment"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"auto", "pil"}
    assert rows["pil"]["speedup_vs_ref"] == 1.0
    assert rows["auto"]["speedup_vs_ref"] == rows["pil"]["step_s"] / rows["auto"]["step_s"]
    assert all(r["data_s"] > 0 for r in rows.values())  # the loader was timed, not random tensors
    assert " pil " in stdout
    # Without --data there is nothing to augment: an error, not a silently ignored flag.
    no_data = [a for a in argv if a not in ("--data", str(tiny_data / "train"))]
    with pytest.raises(SystemExit, match="--augment needs --data"):
        train_step_main(no_data)


def _row(precision: str, step_s: float, mib: float = 10.0) -> dict:
    return {"recipe": "", "arch": "vit_tiny/16", "batch": 2, "crops": "2x32+2x16", "precision": precision,
            "compile": False, "attention": "explicit", "checkpointing": False, "augment": "random",
            "step_s": step_s, "step_peak_mib": mib}  # fmt: skip


def test_rounds_report_the_median_round_and_every_rounds_speedup():
    from bench.step_table import add_comparisons, merge_rounds

    times = [(0.60, 0.40), (0.66, 0.30), (0.57, 0.38)]  # (fp32, bf16) per round; round 2 drifted
    rounds = []
    for i, (fp32, bf16) in enumerate(times):
        rounds.append([_row("fp32", fp32, mib=10.0 + i), _row("bf16", bf16, mib=20.0 + i)])
        add_comparisons(rounds[-1])
    ref, fast = merge_rounds(rounds)
    assert ref["step_s"] == 0.60 and fast["step_s"] == 0.38  # each row's median round
    assert ref["step_peak_mib"] == 10.0 and fast["step_peak_mib"] == 22.0  # the whole row of that round
    assert fast["step_s_rounds"] == [0.40, 0.30, 0.38]
    assert fast["speedup_vs_ref_rounds"] == pytest.approx([1.5, 2.2, 0.57 / 0.38])
    assert fast["speedup_vs_ref"] == pytest.approx(0.60 / 0.38)  # between the medians
    # One round: the row as measured, without per-round lists.
    (single,) = merge_rounds([[_row("fp32", 0.5)]])
    assert single["step_s"] == 0.5 and "step_s_rounds" not in single


def test_rounds_below_one_or_without_isolation_are_refused():
    with pytest.raises(SystemExit, match="--rounds must be at least 1, got 0"):
        train_step_main(["--rounds", "0", "--json", "/dev/null"])
    with pytest.raises(SystemExit, match="--rounds needs isolated runs"):
        train_step_main(["--rounds", "2", "--no-isolate", "--json", "/dev/null"])


def test_a_result_json_is_written_whole_with_its_folders(tmp_path, capsys):
    from bench.args import write_result

    path = write_result(tmp_path / "new" / "rows.json", {"rows": [1.5]}, indent=1)
    assert json.loads(path.read_text()) == {"rows": [1.5]} and path.read_text().endswith("\n")
    assert [p.name for p in path.parent.iterdir()] == ["rows.json"]  # no temporary file left beside it
    assert capsys.readouterr().out == f"wrote {path}\n"
