"""Progress bars draw only on a terminal outside Slurm; a training log written to a file has plain lines
with the loss, learning rate and ETA, and no carriage-return frames."""

import fcntl
import os
import struct
import subprocess
import sys
import termios

import pytest

from dino_train.models import build_backbone
from tests.helpers import ENV, REPO


def test_the_bar_draws_only_on_a_terminal_outside_slurm(tmp_path, monkeypatch):
    from dino_train.runtime.progress import use_progress_bar

    master, slave = os.openpty()
    terminal = os.fdopen(slave, "w")
    try:
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
        with open(tmp_path / "log", "w") as a_file:
            assert use_progress_bar("auto", terminal) and use_progress_bar(True, terminal)
            assert not use_progress_bar(False, terminal)
            assert not use_progress_bar("auto", a_file) and not use_progress_bar(True, a_file)
        monkeypatch.setenv("SLURM_JOB_ID", "123")
        assert not use_progress_bar("auto", terminal)
    finally:
        terminal.close()
        os.close(master)


def read_pty(master: int) -> str:
    import select

    out = b""
    while select.select([master], [], [], 0.2)[0]:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    return out.decode(errors="replace")


def test_eval_feature_bars_follow_the_rule(tiny_data, monkeypatch, capsys, one_thread):
    """extract_features draws its bar on a terminal and nothing into a pipe or under Slurm."""
    from dino_train.data import ImageDataset, eval_transform
    from dino_train.measure.features import extract_features

    model = build_backbone("vit_tiny", 8, 32).eval()
    val = ImageDataset(tiny_data / "val", eval_transform(32, 32))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    extract_features(model, val, 8, 0, "cpu", progress=True)
    assert capsys.readouterr().err == ""  # pytest's captured stderr is no terminal
    master, slave = os.openpty()
    # A new pty is 0 columns wide, which tqdm's dynamic width takes literally: give it a console's size.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    terminal = os.fdopen(slave, "w")
    try:
        with capsys.disabled():
            monkeypatch.setattr(sys, "stderr", terminal)
            extract_features(model, val, 8, 0, "cpu", progress=True)
            terminal.flush()
            drawn = read_pty(master)
            assert "features" in drawn and "3/3" in drawn, drawn
            monkeypatch.setenv("SLURM_JOB_ID", "1")
            extract_features(model, val, 8, 0, "cpu", progress=True)
            terminal.flush()
            assert read_pty(master) == ""
    finally:
        terminal.close()
        os.close(master)


@pytest.mark.slow
def test_a_training_log_in_a_file_has_plain_lines_with_the_loss(tiny_data, tmp_path):
    """The demo's recipe through the CLI with its output redirected to a file, as Slurm and `> log` do:
    no carriage-return frames, and the loss and ETA on plain lines."""
    log = tmp_path / "train.log"
    overrides = [
        f"data.path={tiny_data / 'train'}",
        f"train.output_dir={tmp_path / 'run'}",
        "train.max_steps=6",
        "train.log_every_steps=2",
        "data.num_workers=0",
        "data.batch_size_per_gpu=4",  # 6 steps inside the first epoch: no epoch-end checkpoints
        "train.precision=fp32",  # (no bf16-versus-fp32 timing probe)
        "monitor.knn_data=",  # no periodic k-NN or attention images: the log is the subject
        "monitor.attention_images=",
    ]
    cmd = [sys.executable, "dino_train/main.py", "--config", "configs/demo.yaml", *overrides]
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=REPO, env=ENV, stdout=f, stderr=subprocess.STDOUT, timeout=300)
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    assert "\r" not in text
    lines = [x for x in text.splitlines() if x.startswith("step ")]
    assert lines and all(len(x) < 200 for x in lines), text[-3000:]
    assert any(x.startswith("step 6/6") for x in lines), lines
    for line in lines:
        assert "  loss " in line and "  lr " in line and "  eta " in line, line
