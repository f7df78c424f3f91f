"""Stop signals (SIGTERM, SIGUSR1) end a run at the next step with a checkpoint at the last logged step
and exit status 0: sent to the process, to a whole process group (loader workers included), or to
torchrun; and a handler that was there before ours still gets the signal."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dino_train.config import load_config
from dino_train.train import train
from dino_train.train.checkpoint import load_file
from tests.helpers import ENV, REPO, descendants, logged_steps, tiny_overrides, torchrun_cmd, wait_for_step


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


def assert_stopped_with_a_checkpoint(out: Path, stdout: str, stderr: str) -> None:
    assert "stopped by SIGTERM" in stdout, stdout[-2000:]
    assert "exited unexpectedly" not in stderr and "killed by signal" not in stderr, stderr[-3000:]
    state = load_file(out / "checkpoint.pth")
    assert state["step"] == max(logged_steps(out)) >= 1
    assert json.loads((out / "log.jsonl").read_text().splitlines()[0])  # the log is intact JSON


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_checkpoints_at_next_step_and_exits_cleanly(tiny_data, tmp_path, sig, one_thread):
    out = tmp_path / "run"
    cmd = [sys.executable, "dino_train/main.py", *tiny_overrides(tiny_data, out, "train.epochs=50")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(out, proc, 2)
    proc.send_signal(sig)
    stdout, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert f"stopped by {sig.name}" in stdout
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    # The checkpoint is at the last step done: at most one step after the signal, none lost.
    assert ckpt["step"] == max(logged_steps(out))
    assert ckpt["step"] >= 2
    resumed = train(
        load_config(
            None, tiny_overrides(tiny_data, out, "train.epochs=50", f"train.max_steps={ckpt['step'] + 1}")
        )
    )
    assert resumed.step == ckpt["step"] + 1


def test_stop_signal_is_handed_on_to_the_previous_handler():
    from dino_train.runtime.signals import StopSignals

    calls = []
    before = signal.signal(signal.SIGUSR1, lambda s, f: calls.append(s))
    try:
        stop = StopSignals()
        with stop:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert stop.received == signal.SIGUSR1 and calls == []  # recorded, not acted on
        assert stop.hand_on() is True  # after the with block, as train() calls it
        assert calls == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, before)


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers(tiny_data, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_data, out, "train.epochs=50", "data.num_workers=2")
    proc = start_in_new_session([sys.executable, "dino_train/main.py", *overrides], ENV)
    wait_for_step(out, proc, 1, timeout=60)
    assert len(descendants(proc.pid)) >= 3, "the loader workers are not running: the test proves nothing"
    os.killpg(proc.pid, signal.SIGTERM)  # what a terminal or a scheduler does: every process gets it
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]
    assert_stopped_with_a_checkpoint(out, stdout, stderr)


@pytest.mark.slow
@pytest.mark.dist
def test_sigterm_to_torchrun_on_two_ranks(tiny_data, tmp_path):
    """torchrun answers SIGTERM by forwarding it to each rank's process group (loader workers included),
    waiting up to 30 s, then re-raising its SignalException: it exits 1 whatever the ranks do. The ranks
    checkpoint at the same step and exit 0."""
    out, exits = tmp_path / "run", tmp_path / "exits"
    exits.mkdir()
    overrides = tiny_overrides(tiny_data, out, "train.epochs=50", "data.num_workers=2")
    cmd = torchrun_cmd(2, str(REPO / "tests" / "rank_exit.py"), *overrides)
    proc = start_in_new_session(cmd, {**ENV, "RANK_EXIT_DIR": str(exits)})
    wait_for_step(out, proc, 1, timeout=60)
    assert len(descendants(proc.pid)) >= 7, "torchrun, 2 ranks and their 4 loader workers should be running"
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert {p.name: p.read_text() for p in exits.iterdir()} == {"rank0": "0", "rank1": "0"}
    assert proc.returncode == 0 or (proc.returncode == 1 and "got signal: 15" in stderr), stderr[-3000:]
    assert_stopped_with_a_checkpoint(out, stdout, stderr)
