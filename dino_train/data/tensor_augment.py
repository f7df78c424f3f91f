"""DINO's multi-crop augmentation on uint8 tensors: per sample, decode (JPEGs at reduced size when the
largest crop allows), draw every random parameter and crop + resize; per batch, the photometric ops of
``dino_train.data.photometric``, in the loader workers (``data.augment_device=cpu``) or on the GPU after
the transfer (``cuda``, through ``photometric.crops_to_device``).

Random draws come from torch's global generator, which ``MultiCropDataset`` seeds per sample from
(seed, epoch, index): crops and parameters are the same whatever worker loads a sample, and after a
resume. The release's PIL pipeline (``MultiCropAugmentation``) stays as the ``pil`` reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from dino_train.data.datasets import ImageDataset, to_rgb
from dino_train.data.photometric import (
    BLUR_SIGMA,
    N_PARAMS,
    P_BRIGHTNESS,
    P_CONTRAST,
    P_FLIP,
    P_GRAY,
    P_HUE,
    P_JITTER,
    P_ORDER,
    P_SATURATION,
    P_SIGMA,
    P_SOLARIZE,
    P_SOLARIZE_AT,
    SOLARIZE_THRESHOLD,
)
from dino_train.data.transforms import check_solarize_p

# RandomResizedCrop's defaults: 10 tries, aspect ratio log-uniform in [3/4, 4/3].
CROP_TRIES = 10
CROP_RATIO = (3 / 4, 4 / 3)
# Uniforms per crop: (area, log ratio) per try and (top, left), then the photometric draws.
CROP_UNIFORMS = 2 * CROP_TRIES + 2
PHOTO_UNIFORMS = 14


def random_resized_crop_box(
    height: int, width: int, scale: tuple[float, float], u: Sequence[float]
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box ``(top, left, h, w)`` on a height x width image from CROP_UNIFORMS
    uniforms in [0, 1): up to 10 tries of an area fraction uniform in ``scale`` and a log-uniform aspect
    ratio, the first that fits at a uniform position; else the centre crop clipped to the ratio range."""
    area = height * width
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for t in range(CROP_TRIES):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[2 * t])
        ratio = math.exp(log_lo + (log_hi - log_lo) * u[2 * t + 1])
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            # floor(u * (n + 1)) is randint(0, n) inclusive, as torch.randint(0, n + 1) draws.
            top = min(int(u[-2] * (height - h + 1)), height - h)
            left = min(int(u[-1] * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif in_ratio > CROP_RATIO[1]:
        h, w = height, int(round(height * CROP_RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def photometric_params(
    u: torch.Tensor,
    blur_p: torch.Tensor,
    solarize_p: torch.Tensor,
    solarize_at: float = SOLARIZE_THRESHOLD,
) -> torch.Tensor:
    """Uniforms (n, PHOTO_UNIFORMS) and per-crop blur and solarise probabilities (n,) -> parameter rows
    (n, N_PARAMS): the release's flip p 0.5, ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8 in a uniformly
    random op order, grayscale p 0.2, blur radius U[0.1, 2] px (a sigma, as PIL's); solarisation from
    ``solarize_at`` up (a fraction in [0, 1], not an 8-bit level)."""
    p = torch.zeros(u.shape[0], N_PARAMS)
    p[:, P_FLIP] = (u[:, 0] < 0.5).float()
    p[:, P_JITTER] = (u[:, 1] < 0.8).float()
    p[:, P_BRIGHTNESS] = 0.6 + 0.8 * u[:, 2]  # U[1 - 0.4, 1 + 0.4]
    p[:, P_CONTRAST] = 0.6 + 0.8 * u[:, 3]
    p[:, P_SATURATION] = 0.8 + 0.4 * u[:, 4]  # U[1 - 0.2, 1 + 0.2]
    p[:, P_HUE] = -0.1 + 0.2 * u[:, 5]  # U[-0.1, 0.1]
    # The ranks of 4 i.i.d. uniforms are a uniformly random permutation, as torch.randperm(4).
    p[:, P_ORDER : P_ORDER + 4] = u[:, 6:10].argsort(dim=1).float()
    p[:, P_GRAY] = (u[:, 10] < 0.2).float()
    sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[:, 12]
    p[:, P_SIGMA] = torch.where(u[:, 11] < blur_p, sigma, torch.zeros(()))
    p[:, P_SOLARIZE] = (u[:, 13] < solarize_p).float()
    p[:, P_SOLARIZE_AT] = solarize_at
    return p


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W), a channels-last view of one copy of the pixels (the
    layout torch's uint8 antialiased resize runs fastest on)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)


class TensorMultiCrop:
    """PIL image -> (uint8 crops [g1, g2, l1..lN] (3, S, S), parameter rows (2 + N, N_PARAMS)).

    The crops are RandomResizedCrop's (bicubic, antialiased); the rows say which ops
    ``photometric.photometric`` applies: blur p 1.0 / 0.1 / 0.5 on global 1 / global 2 / locals,
    solarise p 0.2 on global 2 (``solarize_p`` for global 1, global 2, locals; ``solarize_threshold``
    in 8-bit levels, 0 inverting every pixel), the rest with the same probabilities on every crop, each
    crop drawing its own (the release calls its transforms once per crop). ``min_short_side`` is the
    short side (pixels) JPEG decoding may reduce to.
    """

    def __init__(
        self,
        global_crops_size: int = 224,
        global_crops_scale: tuple[float, float] = (0.4, 1.0),
        local_crops_number: int = 8,
        local_crops_size: int = 96,
        local_crops_scale: tuple[float, float] = (0.05, 0.4),
        solarize_p: tuple[float, float, float] = (0.0, 0.2, 0.0),
        solarize_threshold: int = 128,
    ):
        self.global_size, self.local_size = global_crops_size, local_crops_size
        self.global_scale, self.local_scale = tuple(global_crops_scale), tuple(local_crops_scale)
        self.local_number = local_crops_number
        n = 2 + local_crops_number
        self.blur_p = torch.tensor([1.0, 0.1] + [0.5] * local_crops_number)
        g1, g2, local = check_solarize_p(solarize_p)
        self.solarize_p = torch.tensor([g1, g2] + [local] * local_crops_number)
        self.solarize_at = solarize_threshold / 255  # the fraction the parameter rows carry
        self.sizes = [global_crops_size] * 2 + [local_crops_size] * local_crops_number
        self.scales = [self.global_scale] * 2 + [self.local_scale] * local_crops_number
        self.n_crops = n
        # Twice the largest crop keeps a global crop at area scales down to 0.25 (sides >= half the
        # short side) downsampled, never upsampled, after a reduced-size decode.
        self.min_short_side = 2 * max(global_crops_size, local_crops_size)

    def __call__(self, img: Image.Image) -> tuple[list[torch.Tensor], torch.Tensor]:
        u = torch.rand(self.n_crops, CROP_UNIFORMS + PHOTO_UNIFORMS)
        x = pil_to_uint8(img)
        height, width = x.shape[-2:]
        crops = []
        for c, row in enumerate(u[:, :CROP_UNIFORMS].tolist()):
            top, left, h, w = random_resized_crop_box(height, width, self.scales[c], row)
            size = [self.sizes[c], self.sizes[c]]
            crop = TF.resized_crop(x, top, left, h, w, size, InterpolationMode.BICUBIC, antialias=True)
            crops.append(crop.contiguous())
        return crops, photometric_params(u[:, CROP_UNIFORMS:], self.blur_p, self.solarize_p, self.solarize_at)


def draft_size(size: tuple[int, int], min_short_side: int) -> tuple[int, int] | None:
    """The size to ask ``Image.draft`` for so that the short side stays >= ``min_short_side`` (draft
    reduces by 1/2, 1/4 or 1/8 and never below the request); None when no reduction is possible."""
    w, h = size
    short = min(w, h)
    if short < 2 * min_short_side:
        return None
    f = min_short_side / short
    return math.ceil(w * f), math.ceil(h * f)


def load_rgb_draft(path: Path, min_short_side: int) -> Image.Image:
    """Open and decode ``path`` as RGB; a JPEG large enough is decoded at 1/2, 1/4 or 1/8 size (DCT
    scaling: far less work than a full decode) with its short side kept >= ``min_short_side``. Raises
    one of ``datasets.UNREADABLE`` for a bad file, as ``load_rgb``."""
    with Image.open(path) as img:
        request = draft_size(img.size, min_short_side)
        if request is not None:
            img.draft(None, request)  # a no-op for formats other than JPEG
        img.load()
        return to_rgb(img)


class DraftImageDataset(ImageDataset):
    """``ImageDataset`` whose images decode at reduced size where ``min_short_side`` allows."""

    def __init__(self, root: str | Path, min_short_side: int):
        super().__init__(root)
        self.min_short_side = min_short_side

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        return load_rgb_draft(path, self.min_short_side), label
