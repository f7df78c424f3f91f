"""Self-attention maps of a ViT: the exact softmax of one block, the CLS query's map over the patch grid,
the thresholded masks of the DINO paper, and the colouring shared by the image, video and TensorBoard views.

The attention is recomputed from the block's own ``qkv`` weights on the block's real input, captured with a
forward pre-hook, so it is exact even when the model runs fused ``scaled_dot_product_attention``, which
never materialises the attention matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import functional as TF

from dino_train.data.transforms import BICUBIC, IMAGENET_MEAN, IMAGENET_STD
from dino_train.models.backbone import as_vit, patch_size_of


class _BlockInput(Exception):
    """Raised from the pre-hook to stop the forward pass once the wanted block's input is known."""

    def __init__(self, x: Tensor):
        super().__init__()
        self.x = x


def unwrap_vit(model: nn.Module) -> nn.Module:
    """The ViT inside DDP (``.module``) and/or the multi-crop wrapper (``.backbone``); a NotAViTError (a
    TypeError) for any other backbone: attention maps need a ViT's self-attention."""
    return as_vit(model, "attention maps")


def vit_patch_size(model: nn.Module) -> int:
    return patch_size_of(unwrap_vit(model))


def _eager_call(vit: nn.Module, images: Tensor) -> None:
    """Run the backbone as plain Python even when it was compiled in place (``train.compile``): a compiled
    graph never calls the pre-hook that captures the block's input, and nothing is compiled for maps."""
    stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    if stance is not None:
        with stance("force_eager"):
            vit(images)
    else:  # Module.compile() only swaps __call__ for the compiled one; _call_impl is the plain path
        vit._call_impl(images)


def _block_qk(model: nn.Module, images: Tensor, block: int) -> tuple[Tensor, Tensor, float]:
    """q and k of ``blocks[block]``, each (B, heads, N + prefix, head_dim), and its scale."""
    vit = unwrap_vit(model)
    p = vit_patch_size(vit)
    if images.ndim != 4 or images.shape[-2] % p or images.shape[-1] % p:
        raise ValueError(
            f"images must be (B, 3, H, W) with H and W multiples of {p}; got {tuple(images.shape)}"
        )
    depth = len(vit.blocks)
    if not -depth <= block < depth:
        raise IndexError(f"block {block} out of range for a ViT with {depth} blocks")
    attn = vit.blocks[block].attn

    def grab(_module: nn.Module, args: tuple) -> None:
        raise _BlockInput(args[0])

    handle = attn.register_forward_pre_hook(grab)
    was_training = vit.training
    vit.eval()  # drop path and dropout would change the block input
    try:
        with torch.no_grad():
            _eager_call(vit, images)
        raise RuntimeError("the attention block was never called")
    except _BlockInput as got:
        x = got.x
    finally:
        handle.remove()
        vit.train(was_training)
    with torch.no_grad():
        b, n, _ = x.shape
        head_dim = getattr(attn, "head_dim", x.shape[-1] // attn.num_heads)
        qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return q.float(), k.float(), float(attn.scale)


def attention_maps(model: nn.Module, images: Tensor, block: int = -1) -> Tensor:
    """softmax(q k^T * scale) of ``blocks[block]`` in fp32: (B, heads, N+1, N+1) for (B, 3, H, W) images,
    N = (H/p)(W/p) patches plus the CLS token (and any register tokens). Rows sum to 1.

    Memory grows with N^2 (ViT-S/8 at 480x640: 0.55 GB per image); ``cls_attention_maps`` needs only N.
    """
    q, k, scale = _block_qk(model, images, block)
    return torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)


def cls_attention(attn: Tensor, grid: tuple[int, int], num_prefix_tokens: int = 1) -> Tensor:
    """CLS query -> patch keys: (B, heads, Q, N+prefix) with the CLS query first -> (B, heads, h, w).

    ``grid`` is (H/p, W/p): the token count alone does not tell the aspect ratio.
    """
    h, w = grid
    row = attn[:, :, 0, num_prefix_tokens:]
    if row.shape[-1] != h * w:
        raise ValueError(f"{row.shape[-1]} patch tokens do not fill a {h}x{w} grid")
    return row.reshape(*row.shape[:2], h, w)


def cls_attention_maps(model: nn.Module, images: Tensor, block: int = -1) -> Tensor:
    """The CLS row of ``attention_maps`` on the patch grid, (B, heads, H/p, W/p), computed without the
    (N, N) matrix: a softmax is per row, so the CLS row alone is exact."""
    vit = unwrap_vit(model)
    p = vit_patch_size(vit)
    q, k, scale = _block_qk(vit, images, block)
    row = torch.softmax((q[:, :, :1] @ k.transpose(-2, -1)) * scale, dim=-1)
    grid = (images.shape[-2] // p, images.shape[-1] // p)
    return cls_attention(row, grid, int(getattr(vit, "num_prefix_tokens", 1)))


def threshold_masks(cls_attn: Tensor, threshold: float = 0.6) -> Tensor:
    """(B, heads, h, w) attention -> bool masks of the same shape: per head, the fewest patches (the most
    attended) holding at least ``threshold`` of the attention mass."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1]; got {threshold}")
    flat = cls_attn.flatten(2)
    val, idx = torch.sort(flat, dim=-1)  # ascending: the kept patches are a suffix
    val = val.double()  # the cumulative sum decides ties with 1 - threshold: keep the rounding small
    cum = torch.cumsum(val / val.sum(-1, keepdim=True), dim=-1)
    keep_sorted = cum > 1.0 - threshold
    mask = torch.zeros_like(keep_sorted).scatter_(-1, idx, keep_sorted)
    return mask.reshape(cls_attn.shape)


def upsample(maps: Tensor, patch_size: int) -> Tensor:
    """Nearest upsampling of (B, heads, h, w) maps (any dtype, masks included) to (B, heads, h*p, w*p)."""
    return maps.repeat_interleave(patch_size, dim=-2).repeat_interleave(patch_size, dim=-1)


def prepare_image(img: Image.Image, size: int | None, patch_size: int) -> Tensor:
    """PIL image -> (1, 3, H, W) ImageNet-normalised, H and W multiples of ``patch_size``.

    ``size`` (None or 0: keep) is the short side after a bicubic resize; the crop keeps the top-left
    corner so pixel coordinates match the resized image.
    """
    img = img.convert("RGB")
    if size:
        img = TF.resize(img, size, interpolation=BICUBIC)
    w, h = img.size
    h, w = h - h % patch_size, w - w % patch_size
    if h == 0 or w == 0:
        raise ValueError(f"image of {img.size[0]}x{img.size[1]} px is smaller than one {patch_size} px patch")
    x = TF.to_tensor(img.crop((0, 0, w, h)))
    return TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD).unsqueeze(0)


@dataclass
class AttentionSummary:
    """What every view shows. All (B, k, h, w) on the patch grid: k = heads, or 1 for the head mean."""

    heads: Tensor
    mean: Tensor
    head_masks: Tensor
    mean_mask: Tensor


def summarize(model: nn.Module, images: Tensor, threshold: float = 0.6, block: int = -1) -> AttentionSummary:
    """Per-head and head-mean CLS attention of (B, 3, H, W) images, and their ``threshold`` masks."""
    heads = cls_attention_maps(model, images, block)
    mean = heads.mean(1, keepdim=True)
    return AttentionSummary(heads, mean, threshold_masks(heads, threshold), threshold_masks(mean, threshold))


def denormalize(images: Tensor) -> Tensor:
    """ImageNet-normalised (B, 3, H, W) -> RGB in [0, 1]."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)


def colorize(maps: Tensor, cmap: str = "inferno") -> Tensor:
    """(B, h, w) maps -> (B, 3, h, w) RGB in [0, 1], each map min-max scaled on its own (as plt.imsave)."""
    from matplotlib import colormaps  # only the look-up table; no figure is made

    lut = torch.tensor(colormaps[cmap](torch.linspace(0, 1, 256).numpy())[:, :3], dtype=torch.float32)
    flat = maps.float().flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    scaled = (flat - lo) / (hi - lo).clamp_min(1e-12)
    rgb = lut.to(maps.device)[(scaled * 255).round().long()]  # (B, h*w, 3)
    return rgb.transpose(1, 2).reshape(maps.shape[0], 3, *maps.shape[1:])


def overlay(images: Tensor, heat: Tensor, alpha: float = 0.5) -> Tensor:
    """Blend (B, 3, H, W) RGB images in [0, 1] with (B, 3, H, W) coloured maps."""
    return (1 - alpha) * images + alpha * heat


def apply_mask(images: Tensor, masks: Tensor, dim: float = 0.2) -> Tensor:
    """(B, 3, H, W) RGB in [0, 1] darkened to ``dim`` outside (B, H, W) bool masks, with the mask's edge
    drawn in yellow so small regions stay visible."""
    m = masks.float().unsqueeze(1)
    # Edge: mask pixels with an unmasked pixel among their 8 neighbours (a max-pool of the complement).
    edge = m * F.max_pool2d(1 - m, kernel_size=3, stride=1, padding=1)
    out = images * (dim + (1 - dim) * m)
    yellow = images.new_tensor([1.0, 0.9, 0.1]).view(1, 3, 1, 1)
    return out * (1 - edge) + yellow * edge
