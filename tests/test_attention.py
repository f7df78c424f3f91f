"""dino_train.measure.attention: exact attention maps (fused or not), CLS maps, threshold masks, image
preparation, and the TensorBoard panels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dino_train.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dino_train.measure.attention import (
    attention_maps,
    cls_attention,
    cls_attention_maps,
    prepare_image,
    threshold_masks,
    upsample,
)
from dino_train.models import build_backbone
from dino_train.monitor.periodic import attention_panels


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    torch.manual_seed(0)
    return build_backbone("vit_tiny", patch_size=8, img_size=32).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(1))


def _by_hand(vit: nn.Module, images: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's attention matrix and its attention output, from its raw weights, on the output of
    ``norm1`` (the attention input) captured with a hook on another module than the code under test."""
    blk = vit.blocks[block]
    seen = {}
    h1 = blk.norm1.register_forward_hook(lambda m, a, out: seen.__setitem__("x", out))
    h2 = blk.attn.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out))
    with torch.no_grad():
        vit(images)
    h1.remove(), h2.remove()
    x = seen["x"]
    b, n, c = x.shape
    heads = blk.attn.num_heads
    d = c // heads
    qkv = x @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
    q, k, v = (qkv[..., i * c : (i + 1) * c].reshape(b, n, heads, d).transpose(1, 2) for i in range(3))
    attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(b, n, c) @ blk.attn.proj.weight.T + blk.attn.proj.bias
    return attn, out - seen["out"]


@pytest.mark.parametrize("block", [-1, 0, 5])
def test_maps_equal_hand_computation_with_fused_attention(vit, images, block):
    for blk in vit.blocks:
        blk.attn.fused_attn = True  # the model itself never builds the matrix
    assert vit.blocks[block].attn.fused_attn
    attn = attention_maps(vit, images, block)
    expected, out_diff = _by_hand(vit, images, block)
    n = (24 // 8) * (40 // 8) + 1
    assert attn.shape == (2, 3, n, n)
    torch.testing.assert_close(attn, expected, rtol=1e-5, atol=1e-6)
    # The explicit matrix reproduces what the fused kernel computed: these are the maps the model uses.
    assert out_diff.abs().max() < 1e-4
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, n))


def test_maps_equal_timm_explicit_attention(vit, images):
    """timm's own non-fused path: the softmax it feeds to attn_drop is our matrix."""
    attn_mod = vit.blocks[-1].attn
    seen = {}
    handle = attn_mod.attn_drop.register_forward_hook(lambda m, a, out: seen.__setitem__("a", out))
    attn_mod.fused_attn = False
    try:
        with torch.no_grad():
            vit(images)
    finally:
        attn_mod.fused_attn = True
        handle.remove()
    torch.testing.assert_close(attention_maps(vit, images), seen["a"], rtol=1e-5, atol=1e-6)


def test_cls_maps_are_the_cls_row_and_train_mode_is_restored(images):
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", patch_size=8, img_size=32, drop_path_rate=0.5).train()
    cls = cls_attention_maps(vit, images)
    assert vit.training  # left as it was
    assert cls.shape == (2, 3, 3, 5)
    # Same maps in eval mode: drop path was off while they were computed.
    full = attention_maps(vit.eval(), images)
    torch.testing.assert_close(cls, cls_attention(full, (3, 5)), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(cls.sum((-2, -1)), 1 - full[:, :, 0, 0])


def test_cls_maps_of_a_vit_with_registers_skip_the_register_tokens(images):
    """Registers (model.num_registers) sit between CLS and the patches: the map is the CLS row over the
    patches only, so the long demo's grid and Jaccard see the image, not the registers."""
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", patch_size=8, img_size=32, timm_kwargs={"reg_tokens": 4}).eval()
    cls = cls_attention_maps(vit, images)
    full = attention_maps(vit, images)  # (B, heads, 1 + 4 + 15, 1 + 4 + 15)
    assert full.shape[-1] == 1 + 4 + 3 * 5 and cls.shape == (2, 3, 3, 5)
    torch.testing.assert_close(cls.flatten(2), full[:, :, 0, 5:], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(cls.sum((-2, -1)), 1 - full[:, :, 0, :5].sum(-1))


def test_maps_of_a_compiled_backbone_are_those_of_the_plain_one(images):
    """train.compile compiles the backbones in place (Module.compile); their maps (the monitor's, the
    demo's) are computed eagerly, the same as without it, and nothing is compiled for them."""
    torch.manual_seed(0)
    plain = build_backbone("vit_tiny", patch_size=8, img_size=32).eval()
    compiled = build_backbone("vit_tiny", patch_size=8, img_size=32).eval()
    compiled.load_state_dict(plain.state_dict())
    compiled.compile()
    torch.testing.assert_close(cls_attention_maps(compiled, images), cls_attention_maps(plain, images))


def test_maps_of_a_compiled_backbone_without_set_stance(images, monkeypatch):
    """torch < 2.6 has no torch.compiler.set_stance: the plain call path gives the same maps."""
    monkeypatch.delattr(torch.compiler, "set_stance")
    torch.manual_seed(0)
    plain = build_backbone("vit_tiny", patch_size=8, img_size=32).eval()
    want = cls_attention_maps(plain, images)
    plain.compile()
    torch.testing.assert_close(cls_attention_maps(plain, images), want)


def test_bad_sizes_and_blocks_are_errors(vit):
    with pytest.raises(ValueError, match="multiples of 8"):
        attention_maps(vit, torch.zeros(1, 3, 24, 30))
    with pytest.raises(IndexError, match="12 blocks"):
        attention_maps(vit, torch.zeros(1, 3, 24, 32), block=12)
    with pytest.raises(TypeError, match="not a ViT"):
        attention_maps(nn.Linear(2, 2), torch.zeros(1, 3, 8, 8))


def test_threshold_mask_by_hand():
    attn = torch.tensor([0.1, 0.5, 0.1, 0.3]).view(1, 1, 2, 2)
    assert threshold_masks(attn, 0.6).flatten().tolist() == [False, True, False, True]
    assert threshold_masks(attn, 0.85).sum() == 3  # 0.5 + 0.3 < 0.85 <= 0.5 + 0.3 + 0.1
    assert threshold_masks(attn, 0.4).flatten().tolist() == [False, True, False, False]


@pytest.mark.parametrize("threshold", [0.1, 0.6, 0.8, 0.95])
def test_threshold_masks_keep_the_share_and_are_minimal(threshold):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, 5, 7, generator=g) * torch.tensor([0.3, 1.0, 3.0, 6.0]).view(1, 4, 1, 1)
    attn = torch.softmax(logits.flatten(2), -1).view_as(logits)
    masks = threshold_masks(attn, threshold)
    assert masks.dtype == torch.bool and masks.shape == attn.shape
    flat, keep = attn.flatten(2).double(), masks.flatten(2)
    flat = flat / flat.sum(-1, keepdim=True)
    kept = (flat * keep).sum(-1)
    smallest_kept = torch.where(keep, flat, torch.inf).min(-1).values
    largest_dropped = torch.where(keep, -torch.inf, flat).max(-1).values
    assert (kept >= threshold - 1e-9).all()
    assert (kept - smallest_kept < threshold + 1e-9).all()  # minimal: one patch fewer is not enough
    assert (smallest_kept >= largest_dropped).all()  # the most attended patches are the ones kept


def test_upsample_is_nearest():
    maps = torch.arange(6.0).view(1, 1, 2, 3)
    up = upsample(maps, 4)
    assert up.shape == (1, 1, 8, 12)
    assert up[0, 0, 5, 9] == maps[0, 0, 1, 2] and up[0, 0, 3, 4] == maps[0, 0, 0, 1]
    assert upsample(maps > 2, 2).dtype == torch.bool


def test_prepare_image_crops_top_left_to_patch_multiples():
    arr = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    x = prepare_image(Image.fromarray(arr), None, 16)
    assert x.shape == (1, 3, 32, 48)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = (torch.from_numpy(arr[:32, :48]).permute(2, 0, 1) / 255 - mean) / std
    torch.testing.assert_close(x[0], expected)
    assert prepare_image(Image.fromarray(arr), 20, 8).shape == (1, 3, 16, 24)  # 20x28 after the resize
    with pytest.raises(ValueError, match="smaller than one"):
        prepare_image(Image.fromarray(arr[:10, :10]), None, 16)


def test_tensorboard_panels_from_a_wrapped_model(vit, images):
    wrapper = nn.Module()
    wrapper.backbone = vit  # like the multi-crop wrapper
    panels = attention_panels(wrapper, images)
    assert panels.shape == (2, 3, 24, 80)
    img = panels[0]
    assert 0 <= img.min() and img.max() <= 1
    # Left half: the de-normalised image; right half: a heat map, constant over each 8x8 patch.
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(img[:, :, :40], (images[0] * std + mean).clamp(0, 1))
    heat = img[:, :, 40:]
    assert torch.equal(heat[:, :8, :8], heat[:, :1, :1].expand(3, 8, 8))
