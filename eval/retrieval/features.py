"""Global image descriptors for retrieval and copy detection, as the release computes them.

- Images: ``thumbnail`` (the release's retrieval: the longer side shrunk to at most ``size`` px, aspect
  kept, never enlarged; images then differ in size, so they go one per batch) or ``square`` (the release's
  copy detection: bicubic resize to ``size`` x ``size``).
- ``cls``: the backbone's output, for our ViTs the final-norm CLS token (any backbone works).
- ``cls+gem``: the CLS token concatenated with the GeM pooling (exponent 4, values clamped at 1e-6) of
  the final-norm patch tokens, the release's copy detection descriptor (2D values per image; ViT only).
- multi-scale: the descriptor at scales 1, 1/sqrt(2) and 1/2 (bilinear), averaged, then L2-normalised,
  as the release's ``multi_scale``.

A ViT input is cropped at the bottom and right to a multiple of the patch size, which is what the
release's strided patch convolution does implicitly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

from dino_train.data.datasets import UNREADABLE, DataError, load_rgb
from dino_train.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dino_train.measure.features import FeatureFn
from dino_train.models.backbone import NotAViTError, as_vit

MULTISCALE_SCALES: tuple[float, ...] = (1.0, 1.0 / math.sqrt(2.0), 0.5)  # the release's multi_scale
GEM_POWER = 4.0  # the release's copy detection pools patch tokens with GeM p = 4
RESIZE_MODES = ("thumbnail", "square")
DESCRIPTORS = ("cls", "cls+gem")


class RetrievalImages(Dataset):
    """Items ``(image (3, H, W) ImageNet-normalised, index)`` of ``files``, resized by ``mode``."""

    def __init__(self, files: Sequence[Path], size: int, mode: str):
        if mode not in RESIZE_MODES:
            raise ValueError(f"resize mode {mode!r} is not one of {', '.join(RESIZE_MODES)}")
        if size < 1:
            raise ValueError(f"image size must be positive, got {size}")
        self.files, self.size, self.mode = list(files), size, mode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path = self.files[index]
        try:
            img = load_rgb(path)
        except UNREADABLE as err:
            raise DataError(f"{path} cannot be read as an image ({err})") from err
        if self.mode == "thumbnail":
            img.thumbnail((self.size, self.size), Image.LANCZOS)
        else:
            img = img.resize((self.size, self.size), Image.BICUBIC)
        return TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD), index


def patch_multiple(model: nn.Module) -> int:
    """The side a ViT's input must be a multiple of (its patch size); 1 for other backbones."""
    try:
        return int(as_vit(model, "").patch_embed.patch_size[0])
    except NotAViTError:
        return 1


def fit_to_patches(images: Tensor, multiple: int) -> Tensor:
    """(B, 3, H, W) cropped at the bottom and right to sides that are multiples of ``multiple``."""
    h, w = images.shape[-2] // multiple * multiple, images.shape[-1] // multiple * multiple
    if h == 0 or w == 0:
        raise ValueError(
            f"an image of {images.shape[-1]}x{images.shape[-2]} px is below one {multiple} px patch"
        )
    return images[..., :h, :w]


def cls_descriptor(model: nn.Module, images: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, D): the backbone's output (the CLS token of our ViTs)."""
    return model(fit_to_patches(images, patch_multiple(model)))


def gem(tokens: Tensor, power: float = GEM_POWER, floor: float = 1e-6) -> Tensor:
    """Generalised mean of (B, N, D) tokens over N: (mean of clamp(x, floor)^p)^(1/p), (B, D)."""
    return tokens.clamp(min=floor).pow(power).mean(dim=1).pow(1.0 / power)


def cls_gem_descriptor(model: nn.Module, images: Tensor, power: float = GEM_POWER) -> Tensor:
    """(B, 3, H, W) -> (B, 2D): the final-norm CLS token and the GeM of the final-norm patch tokens."""
    vit = as_vit(model, "the cls+gem descriptor (patch tokens)")
    tokens = vit.forward_features(fit_to_patches(images, patch_multiple(vit)))  # (B, prefix + N, D)
    prefix = int(getattr(vit, "num_prefix_tokens", 1))
    return torch.cat([tokens[:, 0], gem(tokens[:, prefix:], power)], dim=1)


def multiscale(fn: FeatureFn, scales: Sequence[float] = MULTISCALE_SCALES) -> FeatureFn:
    """``fn`` averaged over bilinear rescalings of the batch by ``scales``, then L2-normalised."""

    def run(model: nn.Module, images: Tensor) -> Tensor:
        total: Tensor | None = None
        for s in scales:
            x = (
                images
                if s == 1
                else F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False)
            )
            out = fn(model, x).float()
            total = out if total is None else total + out
        assert total is not None
        return F.normalize(total / len(scales), dim=1)

    return run


def descriptor_fn(name: str, scales: Sequence[float] | None = None) -> FeatureFn:
    """The feature function for ``name`` (see ``DESCRIPTORS``), multi-scale when ``scales`` is given."""
    if name not in DESCRIPTORS:
        raise ValueError(f"descriptor {name!r} is not one of {', '.join(DESCRIPTORS)}")
    fn: FeatureFn = cls_descriptor if name == "cls" else cls_gem_descriptor
    return multiscale(fn, scales) if scales else fn
