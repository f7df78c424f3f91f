"""Checkpoints carry a checksum of their tensors and exported backbones a sha256 sidecar: flipped bytes
and replaced files are caught, and resume falls back to the previous checkpoint."""

import hashlib
import zipfile
from pathlib import Path

import pytest
import torch

from dino_train.models import build_backbone
from dino_train.models.loading import load_backbone, read_file
from dino_train.runtime.checksums import CHECKSUM_KEY, sidecar_path
from dino_train.runtime.files import (
    CheckpointError,
)
from dino_train.train.checkpoint import CheckpointManager, export_backbone, load_file
from tests.helpers import training_state


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
