"""Failed saves leave no temporary file behind and say why (a full disk names the free space), and
unusable output folders (a file, a read-only mount) are named."""

import subprocess
from pathlib import Path

import pytest
import torch

from dino_train.runtime.files import (
    CheckpointError,
    OutputDirError,
    atomic_save,
    check_writable_dir,
)
from dino_train.train.checkpoint import CheckpointManager
from tests.helpers import training_state


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
