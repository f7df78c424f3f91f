"""Faults: SIGKILL and resume through torchrun, non-finite steps, dead and hung ranks, checkpoints that do
not fit. (Stop signals: tests/test_stop_signals.py.)"""

import hashlib
import random
import shutil
import subprocess
import time

import pytest
import torch

from dino_train.config import load_config
from dino_train.runtime.files import CheckpointError
from dino_train.train import NonFiniteError, train
from tests.helpers import ENV, REPO, kill_tree, tiny_overrides, torchrun, torchrun_cmd, wait_for_step

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.mark.dist
def test_sigkill_at_a_random_step_then_resume_matches_uninterrupted(tiny_run, tiny_data, tmp_path):
    # 10 steps, the uninterrupted run is the shared one; one thread everywhere, as it ran: a different
    # thread count changes float summation order. The kill comes at least 3 steps before the end.
    _, reference = tiny_run
    extra = ("train.checkpoint_every_steps=1", "train.keep_last=2", "train.num_threads=1")
    threads = torch.get_num_threads()
    out = tmp_path / "killed"
    kill_at = random.Random().randint(1, 7)
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
    kill_tree(proc)
    proc.communicate(timeout=30)
    # A kill during step 1 (logged before its checkpoint is written) may leave no checkpoint at all: the
    # run then starts afresh, and must still end where the uninterrupted one did.
    saved = out / "checkpoint.pth"
    assert saved.exists() or kill_at == 1, f"no checkpoint after step {kill_at}"
    done = torch.load(saved, weights_only=True)["step"] if saved.exists() else 0
    assert done < 10, f"killed at step {done}, after the end"
    try:
        resumed = train(load_config(None, tiny_overrides(tiny_data, out, *extra)))
    finally:
        torch.set_num_threads(threads)
    assert reference.step == resumed.step == 10
    for a, b in ((reference.teacher, resumed.teacher), (reference.student, resumed.student)):
        for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert torch.equal(x, y), f"{k} differs after a kill at step {done}"
    assert torch.equal(reference.center, resumed.center)


def test_non_finite_steps_are_skipped_then_stop_with_the_last_good_checkpoint(tiny_run, tiny_data, tmp_path):
    out = tmp_path / "nan"
    shutil.copytree(tiny_run[0], out)  # a finished run of 10 steps: a third epoch resumes it
    good = (out / "checkpoint.pth").read_bytes()
    # An absurd learning rate blows the weights up to inf at the first step after the resume.
    cfg = load_config(
        None,
        tiny_overrides(
            tiny_data,
            out,
            "train.epochs=3",
            "optim.lr=1e38",
            "optim.warmup_epochs=0",
            "train.max_nonfinite_steps=2",
            "optim.clip_grad=0",
        ),
    )
    with pytest.raises(NonFiniteError) as info:
        train(cfg)
    msg = str(info.value)
    assert "consecutive non-finite steps" in msg and "checkpoint-step00000010.pth" in msg
    assert (out / "checkpoint.pth").read_bytes() == good  # the last good checkpoint is intact


@pytest.mark.dist
@pytest.mark.parametrize("mode", ["die", "hang"])
def test_a_dead_or_hung_rank_stops_the_others_in_bounded_time(tiny_data, tmp_path, mode):
    out = tmp_path / mode
    overrides = tiny_overrides(tiny_data, out, "train.dist_timeout_s=5", "train.epochs=50")
    start = time.time()
    proc = torchrun(2, str(REPO / "tests" / "fault_rank.py"), mode, "3", *overrides, timeout=240)
    elapsed = time.time() - start
    assert proc.returncode != 0
    assert elapsed < 60  # timeout 5 s, plus start-up
    if mode == "hang":
        assert "PEER ERROR" in proc.stderr and "train.dist_timeout_s=5" in proc.stderr


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("change", ["model.out_dim=32", "model.arch=vit_small", "model.patch_size=16"])
def test_checkpoint_of_another_model_is_refused_and_left_intact(tiny_run, tiny_data, tmp_path, change):
    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)  # a run of the tiny model
    before = sha(out / "checkpoint.pth")
    # A third epoch: the run would go on, were the checkpoint of this model.
    other = tiny_overrides(tiny_data, out, change, "train.epochs=3", "data.global_crops_size=32")
    with pytest.raises(CheckpointError, match="does not fit"):
        train(load_config(None, [*other, "data.local_crops_size=16"]))
    assert sha(out / "checkpoint.pth") == before
