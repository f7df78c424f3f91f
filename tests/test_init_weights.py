"""``model.init_weights``: a run starts from each kind of file people hold (the release's backbone files
and full checkpoints, our ``teacher_backbone.pth``, a timm ``.safetensors``); its teacher after the first
step equals the file's weights (teacher momentum 1.0 keeps the teacher as it started through that step)."""

import argparse
import json
from pathlib import Path

import pytest
import timm
import torch

from dino_train.config import load_config
from dino_train.models import build_backbone, build_student_teacher
from dino_train.runtime.files import CheckpointError, with_prefix
from dino_train.train import train
from dino_train.train.checkpoint import export_backbone
from tests.helpers import tiny_overrides

pytestmark = pytest.mark.slow

# The runs' model: tiny_overrides' ViT-Tiny/8 cut to 2 blocks (a fraction of the build time), its position
# grid at the default 224 px.
DEPTH = {"depth": 2}
SHALLOW = "model.timm_kwargs={depth: 2}"
Weights = dict[str, torch.Tensor]


def _release_backbone(folder: Path, data: Path) -> tuple[Path, Weights, Weights | None]:
    src = build_backbone("vit_tiny", patch_size=8, img_size=224, timm_kwargs=DEPTH)
    torch.save(src.state_dict(), folder / "dino_deittiny8_pretrain.pth")
    return folder / "dino_deittiny8_pretrain.pth", src.state_dict(), None


def _release_full(folder: Path, data: Path) -> tuple[Path, Weights, Weights | None]:
    """main_dino.py's checkpoint.pth: a DDP student, a teacher that differs from it, the pickled args."""
    cfg = load_config(None, tiny_overrides(data, folder, SHALLOW))
    student, teacher = build_student_teacher(cfg.model, 224)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))  # the file's teacher is not its student
    ckpt = {
        "student": with_prefix(student.state_dict(), "module."),
        "teacher": teacher.state_dict(),
        "optimizer": {},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_tiny", patch_size=8, out_dim=64),
        "dino_loss": {"center": torch.zeros(1, 64)},
    }
    torch.save(ckpt, folder / "checkpoint.pth")
    return folder / "checkpoint.pth", teacher.backbone.state_dict(), teacher.head.state_dict()


def _ours(folder: Path, data: Path) -> tuple[Path, Weights, Weights | None]:
    src = build_backbone("vit_tiny", patch_size=8, img_size=224, timm_kwargs=DEPTH)
    return export_backbone(src, folder / "teacher_backbone.pth"), src.state_dict(), None


def _timm_safetensors(folder: Path, data: Path) -> tuple[Path, Weights, Weights | None]:
    """timm's own ViT with its classifier (10 classes), which init drops, saved by safetensors."""
    from safetensors.torch import save_file

    src = timm.create_model("vit_tiny_patch16_224", patch_size=8, num_classes=10, **DEPTH)
    save_file(src.state_dict(), str(folder / "vit_tiny_patch8.safetensors"))
    backbone = {k: v for k, v in src.state_dict().items() if not k.startswith("head.")}
    return folder / "vit_tiny_patch8.safetensors", backbone, None


@pytest.mark.parametrize(
    "make, init_head",
    [(_release_backbone, True), (_release_full, True), (_release_full, False), (_ours, True),
     (_timm_safetensors, True)],
    ids=["release-backbone", "release-full", "release-full-fresh-head", "ours-teacher-backbone",
         "timm-safetensors"],
)  # fmt: skip
def test_first_step_teacher_equals_the_file(make, init_head, tiny_data, tmp_path, one_thread):
    torch.manual_seed(5)  # not the run's seed: a fresh head differs from the file's
    path, backbone, head = make(tmp_path, tiny_data)
    out = tmp_path / "run"
    extra = [f"model.init_weights={path}", f"model.init_head={str(init_head).lower()}"]
    cfg = load_config(
        None,
        tiny_overrides(tiny_data, out, SHALLOW, *extra, "dino.momentum_teacher=1.0", "train.max_steps=1"),
    )
    res = train(cfg)
    ours = res.teacher.backbone.state_dict()
    assert set(ours) == set(backbone)
    for k, v in backbone.items():
        assert torch.equal(ours[k], v), k
    if head is not None:
        same = [torch.equal(res.teacher.head.state_dict()[k], v) for k, v in head.items()]
        assert all(same) if init_head else not any(same)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    init = [r for r in records if r.get("kind") == "init"]
    assert len(init) == 1 and init[0]["file"] == str(path)
    message = init[0]["message"]
    took_head = head is not None and init_head
    assert ("head from the file" in message) == took_head and ("fresh head" in message) == (not took_head)


def test_a_file_that_does_not_fit_is_refused_by_name(tiny_data, tmp_path, one_thread):
    """A ViT-Small file for a ViT-Tiny run: refused before any step, naming the file and the shapes."""
    bad = build_backbone("vit_small", patch_size=8, img_size=224, timm_kwargs=DEPTH)
    torch.save(bad.state_dict(), tmp_path / "small.pth")
    init = f"model.init_weights={tmp_path / 'small.pth'}"
    cfg = load_config(None, tiny_overrides(tiny_data, tmp_path / "r", SHALLOW, init))
    with pytest.raises(CheckpointError, match=r"small\.pth: the backbone weights do not fit") as err:
        train(cfg)
    assert "model (192,), file (384,)" in str(err.value)
    assert not (tmp_path / "r" / "checkpoint.pth").exists()


def test_frozen_backbone_epochs_train_the_fresh_head_only(tiny_data, tmp_path, one_thread):
    """Continued pretraining from a backbone without its head: with train.freeze_backbone_epochs=1 the
    student's and the teacher's backbones are exactly the file's after the first epoch; in the second the
    backbone trains, and the head goes on training."""
    path, backbone, _ = _release_backbone(tmp_path, tiny_data)
    out = tmp_path / "run"
    over = [f"model.init_weights={path}", "train.freeze_backbone_epochs=1", "train.saveckp_freq=1"]
    res = train(load_config(None, tiny_overrides(tiny_data, out, SHALLOW, *over)))
    first = torch.load(out / "checkpoint0000.pth", weights_only=True)  # after epoch 0 (5 steps)
    for part, prefix in (("student", "module."), ("teacher", "")):  # the release's layout: DDP's student
        for k, v in backbone.items():
            assert torch.equal(first[part][f"{prefix}backbone.{k}"], v), (part, k)
    fresh = res.teacher.head.state_dict()  # the head at the end, against the head after epoch 0 ...
    assert any(not torch.equal(first["teacher"][f"head.{k}"], fresh[k]) for k in fresh)
    last = res.teacher.backbone.state_dict()  # ... and the backbone, which trained in epoch 1
    assert any(not torch.equal(last[k], v) for k, v in backbone.items())
