"""DINO's multi-crop augmentation for N-band images (``data.channels``, ``data.band_stats``), each op
defined per band so that it means the same for 1, 4 or 13 bands.

Per crop, as the release's RGB pipeline: RandomResizedCrop (bicubic, antialiased, the same boxes as
``tensor_augment``), a horizontal flip with p 0.5, normalisation by the data set's per-band mean and std,
then with p 0.8 a brightness and a contrast factor drawn for each band on its own from U[0.6, 1.4]
(ColorJitter's 0.4, in normalised units: see ``jitter_bands``), Gaussian blur (p 1.0 / 0.1 / 0.5 on
global 1 / global 2 / locals, sigma U[0.1, 2] px) and solarisation (``data.solarize_p``): every value
above its band's mean reflected about the mean, ``x -> -x`` in normalised units, as 8-bit solarisation
reflects the values above mid-range about mid-range (``x -> 1 - x`` for ``x >= 0.5``). Saturation, hue
and greyscale mix the bands as colours and have no meaning for other bands: they are not applied.

Random draws come from torch's global generator, seeded per sample by ``MultiCropDataset``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from dino_train.data.bands import BandStats
from dino_train.data.photometric import BLUR_SIGMA, gaussian_blur
from dino_train.data.tensor_augment import CROP_UNIFORMS, TensorMultiCrop, random_resized_crop_box
from dino_train.data.transforms import eval_transform

JITTER_P = 0.8
JITTER_RANGE = (0.6, 1.4)  # ColorJitter(brightness=0.4, contrast=0.4)


# Where a band's "black" sits, in its standard deviations below its mean: ImageNet's normalisation puts
# 0 (black) 2.0 stds below the mean on average over R, G and B (0.485 / 0.229, 0.456 / 0.224, 0.406 /
# 0.225). Brightness scales about this level, so a factor moves a band as far, in its own stds, as
# ColorJitter moves an RGB channel, whatever the file's offset (a 16-bit band's zero may lie 50 stds away).
BLACK_LEVEL = -2.0


def jitter_bands(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """Normalised (C, H, W) with one brightness and one contrast factor per band (C,): brightness scales
    a band about ``BLACK_LEVEL`` (as torchvision's scales an RGB channel about black), contrast scales its
    deviation from the band's mean in the image (torchvision's rule, one band at a time)."""
    x = (x - BLACK_LEVEL) * brightness.view(-1, 1, 1) + BLACK_LEVEL
    mean = x.mean(dim=(-2, -1), keepdim=True)
    return (x - mean) * contrast.view(-1, 1, 1) + mean


def solarize_bands(x: torch.Tensor) -> torch.Tensor:
    """Normalised (C, H, W): values above their band's mean (0) reflected about it."""
    return torch.where(x > 0, -x, x)


class BandMultiCrop:
    """(C, H, W) float32 of a file's values -> [g1, g2, l1..lN], each (C, S, S) normalised by ``stats``."""

    def __init__(
        self,
        stats: BandStats,
        global_crops_size: int = 224,
        global_crops_scale: tuple[float, float] = (0.4, 1.0),
        local_crops_number: int = 8,
        local_crops_size: int = 96,
        local_crops_scale: tuple[float, float] = (0.05, 0.4),
        solarize_p: tuple[float, float, float] = (0.0, 0.2, 0.0),
    ):
        self.stats = stats
        # The RGB tensor path's per-crop layout: sizes, scales and the blur and solarise probabilities.
        layout = TensorMultiCrop(global_crops_size, global_crops_scale, local_crops_number, local_crops_size,
                                 local_crops_scale, solarize_p)  # fmt: skip
        self.sizes, self.scales, self.n_crops = layout.sizes, layout.scales, layout.n_crops
        self.blur_p, self.solarize_p = layout.blur_p.tolist(), layout.solarize_p.tolist()

    def crop(self, x: torch.Tensor, c: int) -> torch.Tensor:
        """Crop number ``c`` (0, 1 global; 2.. local) of ``x``, drawing its parameters now."""
        channels = x.shape[0]
        box = random_resized_crop_box(
            x.shape[-2], x.shape[-1], self.scales[c], torch.rand(CROP_UNIFORMS).tolist()
        )
        size = [self.sizes[c]] * 2
        y = TF.resized_crop(x, *box, size, InterpolationMode.BICUBIC, antialias=True)
        u = torch.rand(5)
        if u[0] < 0.5:
            y = y.flip(-1)
        factors = JITTER_RANGE[0] + (JITTER_RANGE[1] - JITTER_RANGE[0]) * torch.rand(2, channels)
        y = self.stats.normalize(y)
        if u[1] < JITTER_P:
            y = jitter_bands(y, factors[0], factors[1])
        if u[2] < self.blur_p[c]:
            sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[3]
            y = gaussian_blur(y[None], sigma.view(1))[0]
        if u[4] < self.solarize_p[c]:
            y = solarize_bands(y)
        return y

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.crop(x, c) for c in range(self.n_crops)]


def band_eval_transform(
    stats: BandStats, resize: int = 256, crop: int = 224
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The release's evaluation preprocessing for bands: bicubic resize of the short side to ``resize``
    (antialiased), centre crop to ``crop``, per-band normalisation."""

    def transform(x: torch.Tensor) -> torch.Tensor:
        y = TF.resize(x, [resize], InterpolationMode.BICUBIC, antialias=True)
        y = TF.center_crop(y, [crop, crop])
        return stats.normalize(y)

    return transform


def band_train_transform(
    stats: BandStats, crop: int = 224, scale: tuple[float, float] = (0.08, 1.0)
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The linear probe's training augmentation for bands: RandomResizedCrop and a flip, normalised."""

    def transform(x: torch.Tensor) -> torch.Tensor:
        box = random_resized_crop_box(x.shape[-2], x.shape[-1], scale, torch.rand(CROP_UNIFORMS).tolist())
        y = TF.resized_crop(x, *box, [crop, crop], InterpolationMode.BICUBIC, antialias=True)
        if torch.rand(()) < 0.5:
            y = y.flip(-1)
        return stats.normalize(y)

    return transform


def eval_preprocess(stats: BandStats | None, resize: int, crop: int) -> Callable[[Any], torch.Tensor]:
    """The evaluation preprocessing of a backbone's inputs: the release's RGB one (ImageNet statistics)
    when ``stats`` is None, else ``band_eval_transform``."""
    return eval_transform(resize, crop) if stats is None else band_eval_transform(stats, resize, crop)


__all__ = [
    "BandMultiCrop",
    "band_eval_transform",
    "band_train_transform",
    "eval_preprocess",
    "jitter_bands",
    "solarize_bands",
]
