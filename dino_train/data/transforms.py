"""DINO's multi-crop augmentation, as the original release defines it, and the evaluation transform."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BICUBIC = T.InterpolationMode.BICUBIC
RESIZE_RATIO = 256 / 224  # Resize(256) then CenterCrop(224): the short side is resized to crop * 256 / 224


def resize_for(crop: int) -> int:
    """The short side to resize to before a centre crop of ``crop`` pixels, as the release (256 for 224):
    the one rule of every evaluation door (the eval tools, the training monitor, ``dino.``, the demo)."""
    return round(crop * RESIZE_RATIO)


class RandomGaussianBlur:
    """PIL Gaussian blur with probability ``p`` and a radius uniform in [radius_min, radius_max].

    The release blurs with PIL (a radius, no kernel size), unlike torchvision's GaussianBlur. Randomness
    comes from torch's global RNG, so one torch seed fixes all augmentation draws.
    """

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if torch.rand(()).item() >= self.p:
            return img
        radius = self.radius_min + (self.radius_max - self.radius_min) * torch.rand(()).item()
        return img.filter(ImageFilter.GaussianBlur(radius=radius))


def check_solarize_p(solarize_p: Sequence[float]) -> tuple[float, float, float]:
    """Solarisation's probabilities for global crop 1, global crop 2 and the local crops, checked."""
    if len(solarize_p) != 3:
        raise ValueError(f"solarize_p: expected 3 probabilities (global 1, global 2, locals): {solarize_p}")
    g1, g2, local = (float(p) for p in solarize_p)
    return g1, g2, local


class RandomSolarize:
    """PIL solarisation (invert pixels at or above ``threshold``, 0-255) with probability ``p``."""

    def __init__(self, p: float = 0.2, threshold: int = 128):
        self.p, self.threshold = p, threshold

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img, self.threshold) if torch.rand(()).item() < self.p else img


def _normalize() -> T.Compose:
    return T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class MultiCropAugmentation:
    """PIL image -> [g1, g2, l1, ..., lN], float tensors (3, H, W), ImageNet-normalised.

    Global crop 1 is always blurred; global crop 2 is blurred with p 0.1 and solarised with p 0.2; local
    crops are blurred with p 0.5. All crops share flip, colour jitter (p 0.8) and grayscale (p 0.2).
    ``solarize_p`` (global 1, global 2, locals) and ``solarize_threshold`` change the solarisation.
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
        # A solariser of p 0 is left out: it would draw a random number, and the release's settings
        # must draw the release's random numbers.
        probs = check_solarize_p(solarize_p)
        solar = [[RandomSolarize(p, solarize_threshold)] if p > 0 else [] for p in probs]
        flip_and_color_jitter = T.Compose(
            [
                T.RandomHorizontalFlip(p=0.5),
                T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
            ]
        )
        global_crop = T.RandomResizedCrop(global_crops_size, scale=global_crops_scale, interpolation=BICUBIC)
        self.global1 = T.Compose(
            [global_crop, flip_and_color_jitter, RandomGaussianBlur(1.0), *solar[0], _normalize()]
        )
        self.global2 = T.Compose(
            [global_crop, flip_and_color_jitter, RandomGaussianBlur(0.1), *solar[1], _normalize()]
        )
        self.local_crops_number = local_crops_number
        self.local = T.Compose(
            [
                T.RandomResizedCrop(local_crops_size, scale=local_crops_scale, interpolation=BICUBIC),
                flip_and_color_jitter,
                RandomGaussianBlur(0.5),
                *solar[2],
                _normalize(),
            ]
        )

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        crops = [self.global1(img), self.global2(img)]
        crops.extend(self.local(img) for _ in range(self.local_crops_number))
        return crops


def eval_transform(resize: int = 256, crop: int = 224) -> Callable[[Image.Image], torch.Tensor]:
    """The release's evaluation preprocessing: bicubic resize of the short side, centre crop, normalise."""
    return T.Compose([T.Resize(resize, interpolation=BICUBIC), T.CenterCrop(crop), _normalize()])
