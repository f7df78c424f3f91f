"""Fidelity to the original release: its position-embedding interpolation at every input size, its
checkpoint layout (a 224 px position grid whatever the crops, the head's parameter order), its
checkpoint names, and starting a run from existing weights."""

import math

import pytest
import torch
import torch.nn.functional as F

from dino_train.config import load_config
from dino_train.models import build_backbone, build_student_teacher
from dino_train.train import train
from tests.conftest import tiny_overrides


def release_forward(vit, x):
    """The release's ViT forward, written from its description (reference facts 3.8): patch embedding,
    the CLS token, the position grid resized bicubically by (grid + 0.1) / sqrt(N) without antialiasing
    unless the patch count and shape are unchanged, the blocks, the final norm. Returns all tokens."""
    b, _, h, w = x.shape
    p = vit.patch_embed.patch_size[0]
    tokens = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([vit.cls_token.expand(b, -1, -1), tokens], dim=1)
    pos = vit.pos_embed
    n_old, dim = pos.shape[1] - 1, pos.shape[2]
    if not (tokens.shape[1] - 1 == n_old and h == w):
        side = math.sqrt(n_old)
        grid = pos[:, 1:].reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
        grid = F.interpolate(
            grid, scale_factor=((h // p + 0.1) / side, (w // p + 0.1) / side), mode="bicubic"
        )
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)
    tokens = tokens + pos
    for block in vit.blocks:
        tokens = block(tokens)
    return vit.norm(tokens)


@pytest.mark.parametrize("size", [224, 96, 64, 480])
def test_features_follow_the_release_interpolation_at_every_size(size):
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", patch_size=16, img_size=224).eval()
    with torch.no_grad():
        vit.pos_embed.normal_(std=0.5)  # a position grid that matters, unlike the near-zero init
        x = torch.randn(2, 3, size, size)
        ours, ref = vit.forward_features(x), release_forward(vit, x)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    timm_rule = build_backbone("vit_tiny", patch_size=16, img_size=224)
    timm_rule.load_state_dict(vit.state_dict())
    from dino_train.models.pos_embed import use_rule

    use_rule(timm_rule, "timm")
    with torch.no_grad():
        differs = (timm_rule.forward_features(x) - ref).abs().max()
    assert (differs > 1e-3) == (size != 224)  # timm's antialiased rule is what the release differs from


def test_demo_checkpoints_have_the_release_layout(tiny_data, tmp_path):
    """The position grid stays at 224 px whatever the crop size (197 positions at patch 16), so the
    release's ``vit_tiny(patch_size=16)`` loads our teacher strictly; the head's last layer is
    ``weight_g`` then ``weight_v``, the order ``nn.utils.weight_norm`` registers them in."""
    cfg = load_config(None, tiny_overrides(tiny_data, tmp_path, "model.patch_size=16"))
    assert cfg.data.global_crops_size == 32
    student, _ = build_student_teacher(cfg.model, 224)
    sd = student.state_dict()
    assert sd["backbone.pos_embed"].shape == (1, 197, 192)
    expected = {"backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed.proj.weight",
                "backbone.patch_embed.proj.bias", "backbone.norm.weight", "backbone.norm.bias"}  # fmt: skip
    for i in range(12):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            expected |= {f"backbone.blocks.{i}.{part}.weight", f"backbone.blocks.{i}.{part}.bias"}
    expected |= {f"head.mlp.{j}.{n}" for j in (0, 2, 4) for n in ("weight", "bias")}
    expected |= {"head.last_layer.weight_g", "head.last_layer.weight_v"}
    assert set(sd) == expected
    names = [n for n, _ in student.head.named_parameters()]
    assert names[-2:] == ["last_layer.weight_g", "last_layer.weight_v"]


def test_epoch_checkpoints_are_named_as_the_release_names_them(tiny_data, tmp_path):
    """saveckp_freq=1: checkpoint0000.pth after the first epoch, as the release's ``checkpoint{epoch:04}``
    with the 0-based epoch just finished; its ``epoch`` entry is the next epoch, as in the release."""
    train(load_config(None, tiny_overrides(tiny_data, tmp_path, "train.saveckp_freq=1")))
    kept = sorted(p.name for p in tmp_path.glob("checkpoint0*.pth"))
    assert kept == ["checkpoint0000.pth", "checkpoint0001.pth"]
    assert torch.load(tmp_path / "checkpoint0000.pth", weights_only=True)["epoch"] == 1


def test_init_weights_starts_from_the_file(tiny_data, tmp_path):
    """A release-style backbone file: the teacher of a run that starts from it equals the file before
    the first update (the teacher momentum of 1 keeps it so through a step), the head is fresh."""
    torch.manual_seed(5)
    src = build_backbone("vit_tiny", patch_size=8, img_size=224)
    torch.save(src.state_dict(), tmp_path / "dino_deittiny8_pretrain.pth")
    out = tmp_path / "run"
    init = f"model.init_weights={tmp_path / 'dino_deittiny8_pretrain.pth'}"
    res = train(
        load_config(
            None, tiny_overrides(tiny_data, out, init, "dino.momentum_teacher=1.0", "train.max_steps=1")
        )
    )
    for k, v in src.state_dict().items():
        assert torch.equal(res.teacher.backbone.state_dict()[k], v), k
    log = (out / "log.jsonl").read_text()
    assert '"kind": "init"' in log and "fresh head" in log
    # A file that does not fit is refused by name before any step.
    bad = build_backbone("vit_small", patch_size=8, img_size=224)
    torch.save(bad.state_dict(), tmp_path / "small.pth")
    from dino_train.runtime.files import CheckpointError

    with pytest.raises(CheckpointError, match="init_weights.*do not fit"):
        train(
            load_config(
                None,
                tiny_overrides(tiny_data, tmp_path / "r2", f"model.init_weights={tmp_path / 'small.pth'}"),
            )
        )


def test_format_1_optimizer_states_are_reordered_on_resume(tiny_data, tmp_path):
    """Checkpoints written before the head's order changed (weight_v, weight_g) resume with each
    last-layer AdamW state on its own parameter."""
    from dino_train.config import position_grid_size
    from dino_train.runtime.distributed import DistEnv
    from dino_train.train.build import build_modules
    from dino_train.train.state import _upgrade_optimizer

    cfg = load_config(None, tiny_overrides(tiny_data, tmp_path, "model.norm_last_layer=false"))
    mods = build_modules(cfg, DistEnv(), torch.device("cpu"), "fp32")
    last = mods.student_plain.head.last_layer
    pos = {id(p): i for i, p in enumerate(p for g in mods.optimizer.param_groups for p in g["params"])}
    g, v = pos[id(last.weight_g)], pos[id(last.weight_v)]
    # Format 1: the state at g's position belongs to weight_v and the other way round.
    state = {g: {"exp_avg": torch.zeros_like(last.weight_v)}, v: {"exp_avg": torch.zeros_like(last.weight_g)}}
    old = {"state": state, "param_groups": []}
    new = _upgrade_optimizer({"optimizer": old, "format_version": 1}, mods)
    assert new["state"][g]["exp_avg"].shape == last.weight_g.shape
    assert new["state"][v]["exp_avg"].shape == last.weight_v.shape
    assert _upgrade_optimizer({"optimizer": old, "format_version": 2}, mods) is old
    assert position_grid_size(cfg) == 224
