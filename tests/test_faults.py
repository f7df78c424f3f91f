"""Faults: stop signals, SIGKILL and resume through torchrun, non-finite steps, dead and hung ranks,
checkpoints that do not fit."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from dino_train.config import load_config
from dino_train.runtime.distributed import free_port
from dino_train.runtime.files import CheckpointError
from dino_train.train import NonFiniteError, train
from tests.conftest import REPO, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.dist]

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def logged_steps(out):
    log = out / "log.jsonl"
    if not log.exists():
        return []
    return [json.loads(x)["step"] for x in log.read_text().splitlines() if '"kind": "step"' in x]


def wait_for_step(out, proc, step, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()[1][-2000:]}")
        if logged_steps(out) and max(logged_steps(out)) >= step:
            return
        time.sleep(0.05)
    raise AssertionError("run did not reach the step in time")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_checkpoints_at_next_step_and_exits_cleanly(tiny_data, tmp_path, sig):
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


def descendants(pid):
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    children = {}
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(stat))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def torchrun_cmd(nproc, *args):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        *args,
    ]


def test_sigkill_at_a_random_step_then_resume_matches_uninterrupted(tiny_data, tmp_path):
    # 30 steps; one thread everywhere: a different thread count changes float summation order.
    extra = ("train.checkpoint_every_steps=1", "train.keep_last=2", "train.epochs=6", "train.num_threads=1")
    threads = torch.get_num_threads()
    reference = train(load_config(None, tiny_overrides(tiny_data, tmp_path / "ref", *extra)))
    out = tmp_path / "killed"
    kill_at = random.Random().randint(1, 15)
    proc = subprocess.Popen(
        torchrun_cmd(1, "dino_train/main.py", *tiny_overrides(tiny_data, out, *extra)),
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_step(out, proc, kill_at)
    time.sleep(random.random() * 0.3)  # anywhere in the step, a checkpoint write included
    for pid in descendants(proc.pid):
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    # A kill during step 1 (logged before its checkpoint is written) may leave no checkpoint at all: the
    # run then starts afresh, and must still end where the uninterrupted one did.
    saved = out / "checkpoint.pth"
    assert saved.exists() or kill_at == 1, f"no checkpoint after step {kill_at}"
    done = torch.load(saved, weights_only=True)["step"] if saved.exists() else 0
    assert done < 30, f"killed at step {done}, after the end"
    resumed = train(load_config(None, tiny_overrides(tiny_data, out, *extra)))
    assert resumed.step == 30
    for a, b in ((reference.teacher, resumed.teacher), (reference.student, resumed.student)):
        for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert torch.equal(x, y), f"{k} differs after a kill at step {done}"
    assert torch.equal(reference.center, resumed.center)
    torch.set_num_threads(threads)


def test_non_finite_steps_are_skipped_then_stop_with_the_last_good_checkpoint(tiny_data, tmp_path):
    out = tmp_path / "nan"
    train(load_config(None, tiny_overrides(tiny_data, out, "train.max_steps=2")))
    good = (out / "checkpoint.pth").read_bytes()
    # An absurd learning rate blows the weights up to inf at the first step after the resume.
    cfg = load_config(
        None,
        tiny_overrides(
            tiny_data,
            out,
            "optim.lr=1e38",
            "optim.warmup_epochs=0",
            "train.max_nonfinite_steps=2",
            "optim.clip_grad=0",
        ),
    )
    with pytest.raises(NonFiniteError) as info:
        train(cfg)
    msg = str(info.value)
    assert "consecutive non-finite steps" in msg and "checkpoint-step00000002.pth" in msg
    assert (out / "checkpoint.pth").read_bytes() == good  # the last good checkpoint is intact


@pytest.mark.parametrize("mode", ["die", "hang"])
def test_a_dead_or_hung_rank_stops_the_others_in_bounded_time(tiny_data, tmp_path, mode):
    out = tmp_path / mode
    overrides = tiny_overrides(tiny_data, out, "train.dist_timeout_s=5", "train.epochs=50")
    start = time.time()
    proc = subprocess.run(
        torchrun_cmd(2, str(REPO / "tests" / "fault_rank.py"), mode, "3", *overrides),
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=240,
    )
    elapsed = time.time() - start
    assert proc.returncode != 0
    assert elapsed < 60  # timeout 5 s, plus start-up
    if mode == "hang":
        assert "PEER ERROR" in proc.stderr and "train.dist_timeout_s=5" in proc.stderr


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("change", ["model.out_dim=32", "model.arch=vit_small", "model.patch_size=16"])
def test_checkpoint_of_another_model_is_refused_and_left_intact(tiny_data, tmp_path, change):
    out = tmp_path / "run"
    train(load_config(None, tiny_overrides(tiny_data, out, "train.max_steps=1")))
    before = sha(out / "checkpoint.pth")
    with pytest.raises(CheckpointError, match="does not fit"):
        train(
            load_config(
                None,
                tiny_overrides(
                    tiny_data, out, change, "data.global_crops_size=32", "data.local_crops_size=16"
                ),
            )
        )
    assert sha(out / "checkpoint.pth") == before


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
