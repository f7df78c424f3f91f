import pytest
import torch
import torch.nn.functional as F

from dino_train.config import ModelConfig
from dino_train.models import DINOHead, MultiCropWrapper, build_backbone, build_student_teacher

RELEASE_BACKBONE_KEYS = {
    "cls_token",
    "pos_embed",
    "patch_embed.proj.weight",
    "patch_embed.proj.bias",
    "norm.weight",
    "norm.bias",
}
RELEASE_BLOCK_KEYS = {
    f"blocks.0.{k}"
    for k in (
        "norm1.weight",
        "norm1.bias",
        "attn.qkv.weight",
        "attn.qkv.bias",
        "attn.proj.weight",
        "attn.proj.bias",
        "norm2.weight",
        "norm2.bias",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
    )
}


@pytest.mark.parametrize("arch, dim", [("vit_tiny", 192), ("vit_small", 384)])
def test_backbone_names_shapes_and_any_size(arch, dim):
    m = build_backbone(arch, patch_size=16, img_size=224)
    keys = set(m.state_dict())
    assert RELEASE_BACKBONE_KEYS | RELEASE_BLOCK_KEYS <= keys
    assert len([k for k in keys if k.startswith("blocks.") and k.endswith("attn.qkv.weight")]) == 12
    assert m.state_dict()["pos_embed"].shape == (1, 197, dim)
    with torch.no_grad():
        for size in (224, 96, (64, 160)):
            h, w = (size, size) if isinstance(size, int) else size
            assert m(torch.randn(2, 3, h, w)).shape == (2, dim)


def test_backbone_patch8_grid():
    m = build_backbone("vit_tiny", patch_size=8, img_size=64)
    assert m.state_dict()["pos_embed"].shape == (1, 65, 192)
    assert m.state_dict()["patch_embed.proj.weight"].shape == (192, 3, 8, 8)


def test_backbone_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown arch"):
        build_backbone("vit_huge")
    with pytest.raises(ValueError, match="multiple"):
        build_backbone("vit_tiny", patch_size=16, img_size=100)


def test_head_names_shapes_and_frozen_norm():
    head = DINOHead(384, 1000)
    keys = set(head.state_dict())
    assert keys == {
        "mlp.0.weight",
        "mlp.0.bias",
        "mlp.2.weight",
        "mlp.2.bias",
        "mlp.4.weight",
        "mlp.4.bias",
        "last_layer.weight_g",
        "last_layer.weight_v",
    }
    assert head.state_dict()["last_layer.weight_g"].shape == (1000, 1)
    assert head.state_dict()["last_layer.weight_v"].shape == (1000, 256)
    assert head.mlp[0].weight.shape == (2048, 384) and head.mlp[4].weight.shape == (256, 2048)
    assert not head.last_layer.weight_g.requires_grad
    assert head(torch.randn(5, 384)).shape == (5, 1000)
    # With g = 1 the prototypes have unit norm, so the logits of a unit input are cosines in [-1, 1].
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(1000), atol=1e-5)
    assert head(torch.randn(7, 384)).abs().max() <= 1 + 1e-5


def test_head_trainable_norm_and_bn_layout():
    head = DINOHead(192, 64, use_bn=True, norm_last_layer=False, nlayers=3, hidden_dim=32, bottleneck_dim=16)
    assert head.last_layer.weight_g.requires_grad
    assert "mlp.1.running_mean" in head.state_dict() and "mlp.6.weight" in head.state_dict()
    single = DINOHead(192, 64, nlayers=1, bottleneck_dim=16)
    assert single.mlp.weight.shape == (16, 192)


def test_head_matches_weight_norm_formula():
    head = DINOHead(8, 5, norm_last_layer=False, hidden_dim=16, bottleneck_dim=4)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2)
    x = torch.randn(3, 8)
    z = F.normalize(head.mlp(x), dim=-1)
    v, g = head.last_layer.weight_v, head.last_layer.weight_g
    expected = z @ (g * v / v.norm(dim=1, keepdim=True)).T
    assert torch.allclose(head(x), expected, atol=1e-6)


def test_multicrop_wrapper_one_pass_per_resolution():
    calls = []
    backbone = build_backbone("vit_tiny", patch_size=16, img_size=32)
    backbone.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape))
    head = DINOHead(192, 10, hidden_dim=32, bottleneck_dim=8)
    w = MultiCropWrapper(backbone, head).eval()
    crops = [torch.randn(2, 3, 32, 32)] * 2 + [torch.randn(2, 3, 16, 16)] * 3
    with torch.no_grad():
        out = w(crops)
        assert out.shape == (10, 10)
        assert calls == [(4, 3, 32, 32), (6, 3, 16, 16)]
        # Same as running each crop alone.
        alone = torch.cat([w([c]) for c in crops])
    assert torch.allclose(out, alone, atol=1e-5)
    assert {k.split(".")[0] for k in w.state_dict()} == {"backbone", "head"}


def test_student_teacher_equal_start_and_teacher_frozen():
    m = ModelConfig(
        arch="vit_tiny", drop_path_rate=0.1, out_dim=20, head_hidden_dim=32, head_bottleneck_dim=8
    )
    s, t = build_student_teacher(m, 32)
    for (n1, a), (n2, b) in zip(s.state_dict().items(), t.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(a, b)
    assert not any(p.requires_grad for p in t.parameters())
    assert s.backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert not hasattr(t.backbone.blocks[-1].drop_path1, "drop_prob")  # Identity: no drop path in the teacher
