"""Fidelity to the original release: its position-embedding interpolation at every input size, its
checkpoint layout (a 224 px position grid whatever the crops, the head's parameter order), its
checkpoint names. (Starting a run from existing weights: tests/test_init_weights.py.)"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dino_train.config import load_config
from dino_train.models import backbone_spec, build_backbone, build_from_spec
from dino_train.models.loading import load_backbone
from dino_train.train import train
from dino_train.train.checkpoint import export_backbone
from tests.helpers import REPO, tiny_overrides


def release_pos_embed(pos: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """The release's ``interpolate_pos_encoding`` from its description (reference facts 3.8): the
    position grid of ``pos`` (1, 1 + N, D) for an h x w px input, resized bicubically by a scale factor of
    (grid + 0.1) / sqrt(N) without antialiasing, unless the patch count is unchanged and the input square."""
    n_old, dim = pos.shape[1] - 1, pos.shape[2]
    if (h // p) * (w // p) == n_old and h == w:
        return pos
    side = math.sqrt(n_old)
    grid = pos[:, 1:].reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((h // p + 0.1) / side, (w // p + 0.1) / side), mode="bicubic")
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def release_forward(vit, x):
    """The release's ViT forward around our blocks: patch embedding, the CLS token, the position grid
    resized by :func:`release_pos_embed`, the blocks, the final norm. Returns all tokens."""
    b, _, h, w = x.shape
    tokens = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([vit.cls_token.expand(b, -1, -1), tokens], dim=1)
    tokens = tokens + release_pos_embed(vit.pos_embed, h, w, vit.patch_embed.patch_size[0])
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


class _ReleaseBlock(nn.Module):
    """The release's pre-norm block (reference facts 3.8): LayerNorm eps 1e-6, explicit softmax
    attention with a biased qkv, a GELU MLP of ratio 4."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = (
            self.attn.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        )
        attn = (qkv[0] @ qkv[1].transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(dim=-1)
        x = x + self.attn.proj((attn @ qkv[2]).transpose(1, 2).reshape(b, n, c))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class _ReleaseViT(nn.Module):
    """``vision_transformer.VisionTransformer(num_classes=0)`` re-stated from the reference facts (3.8,
    3.9), not from our code: a 224 px position grid, so (1, (224 / patch)^2 + 1, D) positions."""

    def __init__(self, dim: int, depth: int, heads: int, patch: int, img_size: int = 224):
        super().__init__()
        self.patch = patch
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch) ** 2 + 1, dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.blocks = nn.ModuleList(_ReleaseBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        """(B, 3, H, W) -> (B, D): the final-norm CLS token."""
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1)
        tokens = tokens + release_pos_embed(self.pos_embed, x.shape[2], x.shape[3], self.patch)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]


class _ReleaseHead(nn.Module):
    """The release's ``DINOHead(in_dim, out_dim, use_bn, hidden_dim=hidden)`` with nlayers 3, bottleneck
    256: ``mlp`` is Linear, [BatchNorm1d,] GELU, Linear, [BatchNorm1d,] GELU, Linear (so ``mlp.{0,2,4}``
    without BN, ``mlp.{0,1,3,4,6}`` with it) and the legacy ``weight_norm`` last layer (``weight_g`` (K, 1),
    ``weight_v``)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, use_bn: bool):
        super().__init__()
        norm = (lambda: [nn.BatchNorm1d(hidden)]) if use_bn else list
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), *norm(), nn.GELU(),
            nn.Linear(hidden, hidden), *norm(), nn.GELU(),
            nn.Linear(hidden, 256),
        )  # fmt: skip
        with warnings.catch_warnings():  # deprecated in torch, but it is what the release calls
            warnings.simplefilter("ignore", FutureWarning)
            self.last_layer = nn.utils.weight_norm(nn.Linear(256, out_dim, bias=False))


def _release_wrapper(out_dim: int, hidden: int, use_bn: bool = False) -> nn.Module:
    """The release's ``MultiCropWrapper(vit_tiny(patch_size=16), DINOHead(...))``: ViT-Tiny is 192 wide,
    12 blocks of 3 heads (reference facts 3.8)."""
    wrapper = nn.Module()
    wrapper.backbone = _ReleaseViT(dim=192, depth=12, heads=3, patch=16)
    wrapper.head = _ReleaseHead(192, out_dim, hidden, use_bn)
    return wrapper


@pytest.mark.slow
def test_demo_checkpoints_load_strictly_into_the_release_layout(tiny_data, tmp_path, one_thread):
    """configs/demo_v1.yaml (the demo until 2026-12-07) as a user runs it (global crops of 64 px), two steps,
    its checkpoint.pth: the teacher (``backbone.*``, ``head.*``) and the DDP student (``module.*``) load
    with strict=True into the release's ViT-Tiny/16 and DINOHead re-stated from its description: 197
    positions whatever the crop size, the head's ``weight_g`` (K, 1) before ``weight_v``; and the
    release's forward on the loaded teacher gives our backbone's features at the demo's 64 px and at 224
    px."""
    overrides = [f"data.path={tiny_data / 'train'}", f"train.output_dir={tmp_path}", "train.max_steps=2",
                 "data.num_workers=0", "train.progress_bar=false", "train.precision=fp32"]  # fmt: skip
    cfg = load_config(REPO / "configs" / "demo_v1.yaml", overrides)
    assert (cfg.data.global_crops_size, cfg.model.arch, cfg.model.patch_size) == (64, "vit_tiny", 16)
    train(cfg)
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    release = _release_wrapper(cfg.model.out_dim, cfg.model.head_hidden_dim, cfg.model.use_bn_in_head)
    release.load_state_dict(ckpt["teacher"], strict=True)
    ddp = nn.Module()
    ddp.module = _release_wrapper(cfg.model.out_dim, cfg.model.head_hidden_dim, cfg.model.use_bn_in_head)
    ddp.load_state_dict(ckpt["student"], strict=True)
    assert ckpt["teacher"]["backbone.pos_embed"].shape == (1, 197, 192)
    assert ckpt["teacher"]["head.last_layer.weight_g"].shape == (cfg.model.out_dim, 1)
    for sd, prefix in ((ckpt["teacher"], "head."), (ckpt["student"], "module.head.")):
        keys = [k for k in sd if k.startswith(prefix + "last_layer.")]
        assert keys == [prefix + "last_layer.weight_g", prefix + "last_layer.weight_v"]
    ours, _ = load_backbone(tmp_path / "teacher_backbone.pth")
    for size in (64, 224):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), release.backbone(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_epoch_checkpoints_are_named_as_the_release_names_them(tiny_run):
    """saveckp_freq=1 (the shared run's 2 epochs): checkpoint0000.pth after the first epoch, as the
    release's ``checkpoint{epoch:04}`` with the 0-based epoch just finished; its ``epoch`` entry is the
    next epoch, as in the release."""
    out, _ = tiny_run
    kept = sorted(p.name for p in out.glob("checkpoint0*.pth"))
    assert kept == ["checkpoint0000.pth", "checkpoint0001.pth"]
    assert torch.load(out / "checkpoint0000.pth", weights_only=True)["epoch"] == 1


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


def test_teacher_backbone_sidecar_keeps_the_runs_position_rule(tmp_path):
    """A run with model.pos_embed_interpolation=timm: its teacher_backbone.pth (a plain state dict) comes
    back in eval with timm's rule, read from the teacher_backbone.pth.json sidecar; without the sidecar
    the weights alone give the default, the release's rule (different features at 64 px)."""
    torch.manual_seed(0)
    spec = backbone_spec("vit_tiny", 16, 224, {"depth": 2}, pos_embed="timm")
    src = build_from_spec(spec).eval()
    with torch.no_grad():
        src.pos_embed.normal_(std=0.5)  # a position grid that matters
    path = export_backbone(src, tmp_path / "teacher_backbone.pth", spec)
    x = torch.randn(2, 3, 64, 64)
    model, _ = load_backbone(path)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x))
        (tmp_path / "teacher_backbone.pth.json").unlink()
        assert (load_backbone(path)[0](x) - src(x)).abs().max() > 1e-3
