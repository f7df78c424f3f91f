"""Hardening: no loader runs code from a file, checksums catch flipped bytes, failed saves leave nothing
behind and say why, unusable output folders are named, and stop signals to a whole process group (loader
workers included) end a run with a checkpoint and exit status 0."""

import argparse
import builtins
import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from dino_train.models import build_backbone
from dino_train.runtime.checksums import CHECKSUM_KEY, sidecar_path
from dino_train.runtime.files import (
    CheckpointError,
    OutputDirError,
    UnsafeCheckpointError,
    atomic_save,
    check_writable_dir,
)
from dino_train.runtime.safe_load import safe_torch_load
from dino_train.train.checkpoint import CheckpointManager, export_backbone, load_file
from eval.loading import load_backbone, read_file
from tests.conftest import REPO, tiny_overrides
from tests.test_faults import descendants, logged_steps, torchrun_cmd

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def training_state(step: int, size: int = 8) -> dict:
    """Our checkpoint layout in miniature."""
    return {
        "student": {"module.backbone.w": torch.full((size,), float(step))},
        "teacher": {"backbone.w": torch.arange(size, dtype=torch.float32) + step},
        "optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "epoch": step,
        "step": step,
        "dino_loss": {"center": torch.zeros(1, 3)},
        "config": {"train": {"epochs": 3}},
    }


# ------------------------------------------------------------------------------------ malicious pickles


class Payload:
    """Pickles as a call of ``func(*args)``: what a hostile checkpoint does to ``weights_only=False``."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


GLOBAL_NAMES = {"open": "io.open", "exec": "builtins.exec"}  # as the error messages must name them
PAYLOADS = {
    "open": lambda marker: Payload(builtins.open, (str(marker), "w")),
    "exec": lambda marker: Payload(builtins.exec, (f"open({str(marker)!r}, 'w').write('ran')",)),
}


def evil_checkpoint(path: Path, marker: Path, kind: str) -> Path:
    """A file that looks like a release checkpoint, with the payload as its 'args'."""
    state = training_state(1)
    state["teacher"] = {f"backbone.{k}": v for k, v in build_backbone("vit_tiny", 8, 32).state_dict().items()}
    torch.save(state | {"args": PAYLOADS[kind](marker)}, path)
    return path


def test_the_payload_is_live_and_only_trust_runs_it(tmp_path, capsys):
    marker = tmp_path / "marker"
    bad = evil_checkpoint(tmp_path / "bad.pth", marker, "open")
    with pytest.raises(UnsafeCheckpointError):
        safe_torch_load(bad)
    assert not marker.exists()
    obj, notes = read_file(bad, trust=True)  # the user vouched for the file: the full unpickler runs
    assert marker.exists(), "the payload did not run with weights_only=False: the tests below prove nothing"
    assert "weights_only=False" in notes[0] and "WARNING" in capsys.readouterr().err
    assert obj["epoch"] == 1


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_every_loader_refuses_a_pickled_global(tmp_path, kind):
    marker = tmp_path / "marker"
    bad = evil_checkpoint(tmp_path / "checkpoint-step00000001.pth", marker, kind)

    def refused(call):
        with pytest.raises(CheckpointError) as info:
            call()
        text = str(info.value)
        assert str(bad) in text and f"pickled {GLOBAL_NAMES[kind]}," in text, text
        assert "--trust-checkpoint" in text

    refused(lambda: load_backbone(bad))
    refused(lambda: read_file(bad))
    refused(lambda: load_file(bad))
    with pytest.warns(UserWarning, match=GLOBAL_NAMES[kind]):
        refused(lambda: CheckpointManager(tmp_path).load_latest())
    assert not marker.exists()


def test_the_clis_refuse_it(tmp_path):
    from PIL import Image

    marker = tmp_path / "marker"
    bad = evil_checkpoint(tmp_path / "bad.pth", marker, "exec")
    (tmp_path / "data").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "img.png")
    clis = {
        "knn": ["-m", "eval.knn_eval", "--checkpoint", str(bad), "--data", str(tmp_path / "data")],
        "visualize": ["-m", "eval.visualize", "--checkpoint", str(bad), "--input", str(tmp_path / "img.png")],
    }
    clis["visualize"] += ["--output", str(tmp_path / "out"), "--device", "cpu"]
    procs = {
        name: subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in clis.items()
    }
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0, f"{name} accepted the file"
        assert str(bad) in err and "builtins.exec" in err and "--trust-checkpoint" in err, (
            f"{name}: {err[-1500:]}"
        )
    assert not marker.exists()


def test_release_style_args_load_without_trust(tmp_path):
    args = argparse.Namespace(
        arch="vit_small",
        patch_size=16,
        lr=0.0005,
        use_fp16=True,
        norm_last_layer=False,
        global_crops_scale=(0.4, 1.0),
        local_crops_scale=[0.05, 0.4],
        data_path="/datasets/imagenet/train",
        output_dir="/out",
        dist_url="env://",
        clip_grad=3.0,
        rank=0,
        world_size=16,
        gpu=0,
        local_rank=None,
    )
    path = tmp_path / "release.pth"
    torch.save(training_state(100) | {"args": args}, path)
    obj, notes = read_file(path)
    assert obj["args"] == args and notes == []
    assert load_file(path)["args"].world_size == 16
    # pathlib paths in args (forks): rebuilt from strings only, so allowed without trust.
    torch.save(training_state(1) | {"args": argparse.Namespace(out=pathlib.Path("/x/y"))}, path)
    assert read_file(path)[0]["args"].out == pathlib.Path("/x/y")


# ------------------------------------------------------------------------------------------- checksums


def flip_tensor_bytes(path: Path, n: int = 64) -> None:
    """XOR ``n`` bytes in the middle of the largest tensor's storage record, in place (as disk rot would):
    the zip stays well formed and torch's reader, which checks no CRCs, still loads it."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2 - n // 2
        f.seek(start)
        data = bytes(b ^ 0xFF for b in f.read(n))
        f.seek(start)
        f.write(data)


def test_checkpoints_carry_a_checksum_and_exports_stay_plain(tmp_path):
    manager = CheckpointManager(tmp_path / "run")
    path = manager.save(training_state(1), 1)
    raw = torch.load(path, weights_only=True)
    assert raw[CHECKSUM_KEY]["algorithm"] == "sha256-tensors-v1" and len(raw[CHECKSUM_KEY]["digest"]) == 64
    assert CHECKSUM_KEY not in load_file(path)  # verified and removed
    assert load_file(tmp_path / "run" / "checkpoint.pth")["epoch"] == 1
    legacy = tmp_path / "legacy.pth"
    torch.save(training_state(2), legacy)  # written before checksums, or by the release: still loads
    assert load_file(legacy)["epoch"] == 2
    model = build_backbone("vit_tiny", 8, 32)
    export = export_backbone(model, tmp_path / "teacher_backbone.pth")
    sd = torch.load(export, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    build_backbone("vit_tiny", 8, 32).load_state_dict(sd, strict=True)  # as the release's hubconf loads it
    digest = hashlib.sha256(export.read_bytes()).hexdigest()
    assert sidecar_path(export).read_text() == f"{digest}  teacher_backbone.pth\n"  # sha256sum -c format
    load_backbone(export)


def test_flipped_bytes_are_caught_and_resume_uses_the_previous_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(training_state(1, size=50_000), 1)
    newest = manager.save(training_state(2, size=50_000), 2)
    before = torch.load(newest, weights_only=True)
    flip_tensor_bytes(newest)
    after = torch.load(newest, weights_only=True)  # torch itself notices nothing
    tensors = [("student", "module.backbone.w"), ("teacher", "backbone.w")]
    assert any(not torch.equal(before[a][b], after[a][b]) for a, b in tensors), "the flip missed the tensors"
    for loader in (load_file, lambda p: read_file(p)):
        with pytest.raises(CheckpointError, match=f"{newest}: checksum mismatch"):
            loader(newest)
    with pytest.warns(UserWarning, match=r"checkpoint-step00000002.pth: checksum mismatch"):
        state, path = manager.load_latest()
    assert state["step"] == 1 and path.name == "checkpoint-step00000001.pth"


def test_backbone_export_sidecar_catches_flips_and_replacements(tmp_path):
    path = export_backbone(build_backbone("vit_tiny", 8, 32), tmp_path / "teacher_backbone.pth")
    flip_tensor_bytes(path)
    with pytest.raises(CheckpointError, match="checksum mismatch with .*teacher_backbone.pth.sha256"):
        load_backbone(path)
    torch.save(build_backbone("vit_tiny", 8, 32).state_dict(), path)  # replaced by hand: the sidecar says so
    with pytest.raises(CheckpointError, match="delete the sidecar"):
        read_file(path)
    export_backbone(build_backbone("vit_tiny", 8, 32), path)  # a new export rewrites the sidecar
    load_backbone(path)


# ---------------------------------------------------------------------------------------- failed saves


@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount_tmpfs(options) -> a fresh tmpfs folder (we run as root); skips with mount's own reason."""
    mounted = []

    def mount(options: str) -> Path:
        where = tmp_path / f"mnt{len(mounted)}"
        where.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip() or done.returncode}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def test_a_full_disk_leaves_no_temporary_file_and_says_how_much_is_free(mount_tmpfs):
    disk = mount_tmpfs("size=1m")
    manager = CheckpointManager(disk)
    manager.save(training_state(1), 1)
    with pytest.raises(CheckpointError) as info:
        manager.save(training_state(2, size=600_000), 2)  # 2.4 MB of tensors
    text = str(info.value)
    assert "\n" not in text and "checkpoint-step00000002.pth" in text
    assert f"free in {disk}" in text and "intact" in text, text
    assert leftovers(disk) == []
    state, path = manager.load_latest()
    assert state["step"] == 1 and path.name == "checkpoint-step00000001.pth"


def test_any_error_while_serialising_is_a_checkpoint_error(tmp_path):
    class Exploding:
        def __reduce__(self):
            raise ValueError("cannot pickle this")

    target = tmp_path / "c.pth"
    atomic_save({"a": torch.ones(1)}, target, checksum=True)
    with pytest.raises(CheckpointError) as info:
        atomic_save({"a": torch.zeros(1), "b": Exploding()}, target, checksum=True)
    text = str(info.value)
    assert f"could not write {target}" in text and "ValueError: cannot pickle this" in text
    assert f"free in {tmp_path}" in text and "previous file there is intact" in text and "\n" not in text
    assert leftovers(tmp_path) == [] and torch.load(target, weights_only=True)["a"].tolist() == [1.0]


def test_unwritable_output_dirs_are_named(tmp_path, mount_tmpfs):
    good = tmp_path / "new" / "deep"
    check_writable_dir(good, "train.output_dir")
    assert good.is_dir() and list(good.iterdir()) == []
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(OutputDirError, match=f"train.output_dir {a_file} is a file"):
        check_writable_dir(a_file, "train.output_dir")
    with pytest.raises(OutputDirError, match=f"{a_file / 'sub'} cannot be created"):
        check_writable_dir(a_file / "sub", "train.output_dir")
    read_only = mount_tmpfs("ro,size=1m")  # root ignores permission bits, not a read-only mount
    with pytest.raises(OutputDirError, match=f"{read_only} is not writable: Read-only file system"):
        check_writable_dir(read_only, "train.output_dir")
    with pytest.raises(OutputDirError, match=f"{read_only / 'run'} cannot be created: Read-only"):
        check_writable_dir(read_only / "run", "train.output_dir")


# -------------------------------------------------------------------------- stop signals to the group


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
