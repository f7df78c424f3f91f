"""Shards under faults: dino-make-shards killed while writing, a shard cut short or changed after it was
indexed, a shard that disappears while a run reads it, a truncated tar with no index."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dino_train.data import DataError
from dino_train.data.make_shards import main as make_shards
from dino_train.data.shard_index import INCOMPLETE_NAME, load_shard_index
from dino_train.data.shards import build_shard_loader
from tests.helpers import REPO

CROPS = (32, (0.4, 1.0), 2, 16, (0.05, 0.4))


@pytest.fixture(scope="module")
def noise_folder(tmp_path_factory) -> Path:
    """48 noise PNGs of 192 px in two classes: slow enough to decode that a packing run can be caught
    half-way."""
    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    for n in range(48):
        folder = root / f"c{n % 2}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (192, 192, 3), dtype=np.uint8)).save(folder / f"{n:03d}.png")
    return root


def tar_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def test_a_killed_make_shards_is_refused_and_the_same_command_redoes_it(noise_folder, tmp_path):
    whole = tmp_path / "whole"
    assert make_shards([str(noise_folder), str(whole), "--shard-size", "1"]) == 0
    cut = tmp_path / "cut"
    cmd = [
        sys.executable,
        "-m",
        "dino_train.data.make_shards",
        str(noise_folder),
        str(cut),
        "--shard-size",
        "1",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (cut / "shard-000003.tar").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.0005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "packing finished before it could be killed"
    assert (cut / INCOMPLETE_NAME).exists() and 0 < len(tar_bytes(cut)) < 48
    with pytest.raises(DataError, match=f"{cut}: dino-make-shards did not finish .*run the same command"):
        load_shard_index(str(cut))
    assert make_shards([str(noise_folder), str(cut), "--shard-size", "1"]) == 0
    assert tar_bytes(cut) == tar_bytes(whole)
    assert (cut / "shards.json").read_bytes() == (whole / "shards.json").read_bytes()
    assert not (cut / INCOMPLETE_NAME).exists()
    assert load_shard_index(str(cut)).samples == 48
    # A finished folder is still never overwritten.
    assert make_shards([str(noise_folder), str(cut), "--shard-size", "1"]) == 2


@pytest.fixture(scope="module")
def packed(noise_folder, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("packed") / "train"
    assert make_shards([str(noise_folder), str(dst), "--shard-size", "8"]) == 0
    return dst


def test_a_shard_cut_short_or_changed_after_indexing_is_named(packed, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(packed, bad)
    victim = bad / "shard-000002.tar"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        DataError, match=f"shard {victim} is {len(data) // 2} bytes where .* lists {len(data)}"
    ):
        load_shard_index(str(bad))
    # Without the index the shards are counted from their headers: the cut tar is named there.
    (bad / "shards.json").unlink()
    with pytest.raises(DataError, match=f"shard {victim} cannot be read as a tar file"):
        load_shard_index(str(bad))


def test_a_shard_removed_while_a_run_reads_it_is_named(packed, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(packed, moved)
    loader, stream = build_shard_loader(str(moved), "pil", CROPS, 2, 0, 0, 0, 1, False, 10)
    (moved / "shard-000004.tar").unlink()
    with pytest.raises(DataError, match=f"shard {moved / 'shard-000004.tar'} cannot be opened in the middle"):
        list(loader)
