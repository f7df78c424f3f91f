"""Stop signals to a whole process group (loader workers included) end a run, alone or under torchrun,
with a checkpoint at the last logged step and exit status 0."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dino_train.train.checkpoint import load_file
from tests.conftest import REPO, tiny_overrides
from tests.hardening_helpers import ENV
from tests.test_faults import descendants, logged_steps, torchrun_cmd


def start_in_new_session(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for_first_step(out: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not logged_steps(out):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"no step logged: {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)


def assert_stopped_with_a_checkpoint(out: Path, stdout: str, stderr: str) -> None:
    assert "stopped by SIGTERM" in stdout, stdout[-2000:]
    assert "exited unexpectedly" not in stderr and "killed by signal" not in stderr, stderr[-3000:]
    state = load_file(out / "checkpoint.pth")
    assert state["step"] == max(logged_steps(out)) >= 1
    assert json.loads((out / "log.jsonl").read_text().splitlines()[0])  # the log is intact JSON


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers(tiny_data, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_data, out, "train.epochs=50", "data.num_workers=2")
    proc = start_in_new_session([sys.executable, "dino_train/main.py", *overrides], ENV)
    wait_for_first_step(out, proc)
    assert len(descendants(proc.pid)) >= 3, "the loader workers are not running: the test proves nothing"
    os.killpg(proc.pid, signal.SIGTERM)  # what a terminal or a scheduler does: every process gets it
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]
    assert_stopped_with_a_checkpoint(out, stdout, stderr)


@pytest.mark.slow
def test_sigterm_to_torchrun_on_two_ranks(tiny_data, tmp_path):
    """torchrun answers SIGTERM by forwarding it to each rank's process group (loader workers included),
    waiting up to 30 s, then re-raising its SignalException: it exits 1 whatever the ranks do. The ranks
    checkpoint at the same step and exit 0."""
    out, exits = tmp_path / "run", tmp_path / "exits"
    exits.mkdir()
    overrides = tiny_overrides(tiny_data, out, "train.epochs=50", "data.num_workers=2")
    cmd = torchrun_cmd(2, str(REPO / "tests" / "rank_exit.py"), *overrides)
    proc = start_in_new_session(cmd, {**ENV, "RANK_EXIT_DIR": str(exits)})
    wait_for_first_step(out, proc)
    assert len(descendants(proc.pid)) >= 7, "torchrun, 2 ranks and their 4 loader workers should be running"
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert {p.name: p.read_text() for p in exits.iterdir()} == {"rank0": "0", "rank1": "0"}
    assert proc.returncode == 0 or (proc.returncode == 1 and "got signal: 15" in stderr), stderr[-3000:]
    assert_stopped_with_a_checkpoint(out, stdout, stderr)
