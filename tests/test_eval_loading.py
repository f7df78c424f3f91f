"""load_backbone on every checkpoint layout we accept, and its errors."""

import argparse
import datetime
import pathlib

import pytest
import timm
import torch

from dino_train.config import ModelConfig
from dino_train.models import build_backbone, build_student_teacher
from dino_train.models.loading import clean_keys, load_backbone
from dino_train.runtime.files import CheckpointError, with_prefix
from dino_train.train.checkpoint import export_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


def _vit(seed: int, patch: int = 8, img: int = 32) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_backbone("vit_tiny", patch_size=patch, img_size=img).eval()
    # Perturb the norms too, so a weight that failed to load cannot go unnoticed.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _same_features(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def _release_head_state(dim: int) -> dict[str, torch.Tensor]:
    """The release's DINOHead keys, including the legacy weight-norm parameters."""
    return {
        "mlp.0.weight": torch.randn(32, dim),
        "mlp.0.bias": torch.zeros(32),
        "mlp.2.weight": torch.randn(16, 32),
        "mlp.2.bias": torch.zeros(16),
        "last_layer.weight_g": torch.ones(64, 1),
        "last_layer.weight_v": torch.randn(64, 16),
    }


def test_release_backbone_only(tmp_path, images):
    src = _vit(0)
    torch.save(src.state_dict(), tmp_path / "dino_deittiny8_pretrain.pth")
    model, info = load_backbone(tmp_path / "dino_deittiny8_pretrain.pth")
    _same_features(src, model, images)
    assert info["source"] == "backbone-only" and info["checkpoint_key"] is None
    assert (info["arch"], info["patch_size"], info["img_size"], info["depth"]) == ("vit_tiny", 8, 32, 12)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_release_full_checkpoint_teacher_and_student(tmp_path, images):
    teacher, student = _vit(1), _vit(2)
    ckpt = {
        "teacher": with_prefix(teacher.state_dict(), "backbone.")
        | with_prefix(_release_head_state(192), "head."),
        "student": with_prefix(student.state_dict(), "module.backbone.")
        | with_prefix(_release_head_state(192), "module.head."),
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_tiny", patch_size=8, lr=0.0005, global_crops_scale=(0.4, 1.0)),
        "dino_loss": {"center": torch.zeros(1, 64)},
    }
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    model, info = load_backbone(tmp_path / "checkpoint.pth")
    _same_features(teacher, model, images)
    assert info["source"] == "release-checkpoint" and info["epoch"] == 100
    assert "head.last_layer.weight_g" in info["ignored_keys"]
    assert info["notes"] == []  # read with weights_only=True: argparse.Namespace is allowed
    model, info = load_backbone(
        tmp_path / "checkpoint.pth", checkpoint_key="student", arch="vit_tiny", patch_size=8
    )
    _same_features(student, model, images)
    assert info["checkpoint_key"] == "student"


def test_pickled_objects_need_trust(tmp_path, images):
    """A Path in the release's args is a plain value and loads; any other pickled object is refused,
    naming the global, unless the caller trusts the file."""
    src = _vit(3)
    ckpt = {
        "teacher": with_prefix(src.state_dict(), "backbone."),
        "args": argparse.Namespace(out=pathlib.Path("x")),
    }
    torch.save(ckpt, tmp_path / "old.pth")
    model, info = load_backbone(tmp_path / "old.pth")
    _same_features(src, model, images)
    assert info["notes"] == []
    ckpt["args"] = datetime.date(2021, 4, 29)  # a class outside the allow-list (harmless, but unknown)
    torch.save(ckpt, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="datetime"):
        load_backbone(tmp_path / "odd.pth")
    model, info = load_backbone(tmp_path / "odd.pth", trust=True)
    _same_features(src, model, images)
    assert len(info["notes"]) == 1 and "trusted" in info["notes"][0]


def test_our_training_checkpoint_and_export(tmp_path, images):
    student, teacher = build_student_teacher(
        ModelConfig(arch="vit_tiny", patch_size=8, out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16), 32
    )
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01)  # teacher != student, as after training
    state = {
        "student": with_prefix(student.state_dict(), "module."),
        "teacher": teacher.state_dict(),
        "optimizer": {},
        "epoch": 2,
        "dino_loss": {"center": torch.zeros(1, 64)},
        "config": {"model": {"arch": "vit_tiny"}},
        "format_version": 1,
    }
    torch.save(state, tmp_path / "checkpoint.pth")
    model, info = load_backbone(tmp_path / "checkpoint.pth")
    _same_features(teacher.backbone.eval(), model, images)
    assert info["source"] == "training-checkpoint"
    model, _ = load_backbone(tmp_path / "checkpoint.pth", checkpoint_key="student")
    _same_features(student.backbone.eval(), model, images)
    export_backbone(teacher.backbone, tmp_path / "teacher_backbone.pth")
    model, info = load_backbone(tmp_path / "teacher_backbone.pth")
    _same_features(teacher.backbone.eval(), model, images)


def test_64px_demo_model_grid_is_inferred(tmp_path):
    src = _vit(4, patch=16, img=64)
    torch.save(src.state_dict(), tmp_path / "b.pth")
    model, info = load_backbone(tmp_path / "b.pth")
    assert info["img_size"] == 64 and info["patch_size"] == 16
    x = torch.randn(1, 3, 64, 64)
    _same_features(src, model, x)


def test_timm_model_with_local_weights(tmp_path):
    torch.manual_seed(5)
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).eval()
    torch.save(src.state_dict(), tmp_path / "timm.pth")  # with its classifier head.*
    model, info = load_backbone("timm:vit_tiny_patch16_224", weights=tmp_path / "timm.pth")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), src.forward_head(src.forward_features(x), pre_logits=True))
    assert info["ignored_keys"] == ["head.bias", "head.weight"]
    with pytest.raises(CheckpointError, match="nothing is downloaded"):
        load_backbone("timm:vit_tiny_patch16_224")
    # A non-ViT model: its classifier is called fc, which is dropped the same way.
    torch.save(timm.create_model("resnet18", num_classes=10).state_dict(), tmp_path / "r18.pth")
    model, info = load_backbone("timm:resnet18", weights=tmp_path / "r18.pth")
    assert info["ignored_keys"] == ["fc.bias", "fc.weight"] and model(torch.randn(1, 3, 32, 32)).shape == (
        1,
        512,
    )


def test_wrong_arch_or_patch_says_what_the_weights_are(tmp_path):
    torch.save(_vit(6).state_dict(), tmp_path / "b.pth")
    with pytest.raises(
        CheckpointError, match=r"weights are vit_tiny/8 \(embed dim 192.*'vit_small' does not fit"
    ):
        load_backbone(tmp_path / "b.pth", arch="vit_small")
    with pytest.raises(CheckpointError, match="patch size 16 does not fit"):
        load_backbone(tmp_path / "b.pth", patch_size=16)


def test_strict_mismatch_lists_the_differences(tmp_path, images):
    sd = _vit(7).state_dict()
    del sd["blocks.3.mlp.fc1.bias"]
    sd["blocks.3.extra.weight"] = torch.zeros(3)
    sd["norm.weight"] = torch.ones(5)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        load_backbone(tmp_path / "bad.pth")
    text = str(err.value)
    assert "missing from the file (1):\n    blocks.3.mlp.fc1.bias" in text
    assert "unexpected in the file (1):\n    blocks.3.extra.weight" in text
    assert "norm.weight: model (192,), file (5,)" in text
    model, info = load_backbone(tmp_path / "bad.pth", strict=False)
    assert set(info["missing_keys"]) == {"blocks.3.mlp.fc1.bias", "norm.weight"}
    assert set(info["unexpected_keys"]) == {"blocks.3.extra.weight", "norm.weight"}


def test_unreadable_inputs_give_clear_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="notes.txt is not a checkpoint"):
        load_backbone(tmp_path / "notes.txt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_backbone(tmp_path / "missing.pth")
    torch.save(
        {"teacher": {"backbone.cls_token": torch.zeros(1, 1, 192)}, "student": {}, "epoch": 1},
        tmp_path / "c.pth",
    )
    with pytest.raises(CheckpointError, match="no entry 'ema'; entries holding weights: teacher"):
        load_backbone(tmp_path / "c.pth", checkpoint_key="ema")
    torch.save({"state_dict": {"module.linear.weight": torch.zeros(10, 384)}}, tmp_path / "lin.pth")
    with pytest.raises(CheckpointError, match="not a backbone"):
        load_backbone(tmp_path / "lin.pth", checkpoint_key="state_dict")


def test_prefixes_are_stripped_only_at_the_start():
    sd, dropped = clean_keys(
        {"module.backbone.blocks.0.backbone.x": torch.zeros(1), "module.head.mlp.0.weight": torch.zeros(1)}
    )
    assert list(sd) == ["blocks.0.backbone.x"] and dropped == ["head.mlp.0.weight"]
