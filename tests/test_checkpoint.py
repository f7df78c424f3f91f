import os

import pytest
import torch

from dino_train.runtime.files import CheckpointError, atomic_save, strip_prefix, with_prefix
from dino_train.train.checkpoint import LATEST, CheckpointManager, load_file


def fake_state(step):
    return {
        "student": {"module.backbone.w": torch.full((2,), float(step))},
        "teacher": {"backbone.w": torch.zeros(2)},
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": step,
        "dino_loss": {"center": torch.zeros(1, 3)},
        "config": {"train": {"epochs": 3}},
    }


def test_keep_last_and_latest_alias(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        m.save(fake_state(step), step, keep_epoch=1 if step == 1 else None)
    assert [s for s, _ in m.numbered()] == [2, 3]
    assert load_file(tmp_path / LATEST)["epoch"] == 3
    assert load_file(tmp_path / "checkpoint0001.pth")["epoch"] == 1  # the periodic copy survives pruning
    state, path = m.load_latest()
    assert state["epoch"] == 3 and path.name == "checkpoint-step00000003.pth"
    # weights_only loading works: the layout holds plain data only.
    assert torch.load(tmp_path / LATEST, weights_only=True)["config"]["train"]["epochs"] == 3


def test_corrupt_latest_falls_back_to_previous(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=3)
    m.save(fake_state(1), 1)
    newest = m.save(fake_state(2), 2)
    data = newest.read_bytes()
    os.unlink(newest)  # break the hard link first so checkpoint.pth keeps its bytes
    newest.write_bytes(data[: len(data) // 2])  # truncated, as a kill mid-write on a non-atomic writer would
    with pytest.warns(UserWarning, match="checkpoint-step00000002.pth"):
        state, path = m.load_latest()
    assert state["epoch"] == 1 and path.name.endswith("00000001.pth")


def test_nothing_readable_is_an_error_naming_files(tmp_path):
    (tmp_path / "checkpoint-step00000005.pth").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="checkpoint-step00000005.pth"):
        CheckpointManager(tmp_path).load_latest()
    assert CheckpointManager(tmp_path / "empty").load_latest() is None


def test_not_a_training_checkpoint(tmp_path):
    torch.save({"cls_token": torch.zeros(1)}, tmp_path / "backbone.pth")
    with pytest.raises(CheckpointError, match="missing student"):
        load_file(tmp_path / "backbone.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="list"):
        load_file(tmp_path / "list.pth")


def test_failed_write_keeps_previous_file(tmp_path):
    target = tmp_path / "c.pth"
    atomic_save({"a": torch.ones(1)}, target)

    class Unpicklable:
        def __reduce__(self):
            raise OSError(28, "No space left on device")

    with pytest.raises(CheckpointError, match="previous file there is intact"):
        atomic_save({"a": Unpicklable()}, target)
    assert torch.load(target, weights_only=True)["a"].tolist() == [1.0]
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]  # no temporary file left behind


def test_prefix_helpers_only_touch_the_start():
    state = {"module.backbone.x": 1, "head.module.y": 2}
    assert strip_prefix(state, "module.") == {"backbone.x": 1, "head.module.y": 2}
    assert with_prefix({"a": 1}, "module.") == {"module.a": 1}
