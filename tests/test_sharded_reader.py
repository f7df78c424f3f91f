"""Reading an FSDP run's sharded state: the same tensors back through the checked reader; a missing or
short rank file, a damaged ``.metadata``, or one whose pickle would run code, each refused naming the file."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from dino_train.runtime.files import CheckpointError
from dino_train.train.sharded_reader import checked_reader


def saved(folder: Path) -> dict:
    state = {"student": {"w": torch.randn(6, 4), "b": torch.randn(4)}, "teacher": {"w": torch.randn(6, 4)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... a single process"
        dcp.save(state, checkpoint_id=folder)
    return state


def load(folder: Path) -> dict:
    into = {"student": {"w": torch.zeros(6, 4), "b": torch.zeros(4)}, "teacher": {"w": torch.zeros(6, 4)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(into, storage_reader=checked_reader(folder))
    return into


def test_the_checked_reader_loads_what_was_saved(tmp_path):
    state = saved(tmp_path / "s")
    back = load(tmp_path / "s")
    for part in state:
        for k in state[part]:
            assert torch.equal(state[part][k], back[part][k])


def test_a_missing_or_short_rank_file_is_named(tmp_path):
    saved(tmp_path / "s")
    data = next((tmp_path / "s").glob("*.distcp"))
    raw = data.read_bytes()
    data.write_bytes(raw[:-10])
    with pytest.raises(CheckpointError, match=f"{data} is cut short: {len(raw) - 10} bytes"):
        load(tmp_path / "s")
    data.unlink()
    with pytest.raises(CheckpointError, match=f"{data} is missing: the sharded state .* is incomplete"):
        load(tmp_path / "s")


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_metadata_that_would_run_code_or_is_damaged_is_refused(tmp_path):
    saved(tmp_path / "s")
    meta = tmp_path / "s" / ".metadata"
    good = meta.read_bytes()
    marker = tmp_path / "ran"
    meta.write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(CheckpointError, match="posix.mkdir is not part of a checkpoint's metadata"):
        load(tmp_path / "s")
    assert not marker.exists()
    meta.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=f"{meta} cannot be read"):
        load(tmp_path / "s")
    meta.write_bytes(pickle.dumps({"not": "metadata"}))
    with pytest.raises(CheckpointError, match=f"{meta} holds a dict"):
        load(tmp_path / "s")
