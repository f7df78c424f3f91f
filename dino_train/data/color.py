"""Batched colour operations with one factor per image, on any device.

Images are float tensors (B, 3, H, W) with values in [0, 1]; factors are tensors (B,). Each op follows
the PIL operation torchvision's ``ColorJitter`` and ``RandomGrayscale`` run on PIL images (ImageEnhance
blends, ``convert("L")``, an HSV hue rotation), without PIL's rounding to 8 bits between ops.
"""

from __future__ import annotations

import torch

# ITU-R 601-2 luma, the weights of PIL's convert("L").
LUMA = (0.299, 0.587, 0.114)


def _per_image(factor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) in ``x``'s dtype and device, to broadcast over an image batch."""
    return factor.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> luma (B, 1, H, W)."""
    r, g, b = x.unbind(1)
    return (r * LUMA[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2]).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with black: ``x * factor`` per image, clipped to [0, 1] as PIL clips to 8 bits."""
    return (x * _per_image(factor, x)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean gray (one value per image, PIL's ``ImageEnhance.Contrast``)."""
    # The mean of the luma is the luma of the channel means: a (B, 3) reduction, no gray image.
    luma = torch.tensor(LUMA, device=x.device, dtype=x.dtype)
    mean = (x.mean(dim=(-2, -1)) * luma).sum(dim=1).view(-1, 1, 1, 1)
    return torch.lerp(mean.expand_as(x), x, _per_image(factor, x)).clamp_(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's own grayscale version (PIL's ``ImageEnhance.Color``)."""
    return torch.lerp(grayscale(x).expand_as(x), x, _per_image(factor, x)).clamp_(0.0, 1.0)


def _hue6_value_chroma(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) RGB -> hue in sixths of a turn (in [-1, 5), not reduced mod 6), value (the max
    channel) and chroma (max - min), each (B, H, W)."""
    r, g, b = x.unbind(1)
    value = x.amax(dim=1)
    chroma = x.amin(dim=1).neg_().add_(value)
    # The sector offsets 2 and 4 (green, blue max) are folded into the numerators as 2C and 4C, so one
    # division serves all three sectors; ties go to red, then green, as in PIL.
    num = torch.where(
        value == r,
        g - b,
        torch.where(value == g, (b - r).add_(chroma, alpha=2.0), (r - g).add_(chroma, alpha=4.0)),
    )
    # Gray pixels (chroma 0) have num 0, so hue 0 as PIL gives them; the floor only avoids 0 / 0.
    return num.div_(chroma.clamp_min(1e-12)), value, chroma


def _rgb_from_hue6(hue6: torch.Tensor, value: torch.Tensor, chroma: torch.Tensor) -> torch.Tensor:
    """Hue in sixths of a turn (any real), value and chroma (B, H, W) -> RGB (B, 3, H, W).

    The closed form c_n = V - C * clamp(min(k, 4 - k), 0, 1), k = (n + 6 H) mod 6 with n = 5, 3, 1 for
    R, G, B: the six sectors of the piecewise definition in one broadcast expression; min(k, 4 - k) is
    computed as 2 - |k - 2|, in place.
    """
    n = torch.tensor([5.0, 3.0, 1.0], device=hue6.device, dtype=hue6.dtype).view(1, 3, 1, 1)
    k = torch.remainder(hue6.unsqueeze(1) + n, 6.0)
    ramp = k.sub_(2.0).abs_().neg_().add_(2.0).clamp_(0.0, 1.0)
    return ramp.mul_(chroma.unsqueeze(1)).neg_().add_(value.unsqueeze(1))


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> HSV (B, 3, H, W), each channel in [0, 1] (hue in [0, 1))."""
    hue6, value, chroma = _hue6_value_chroma(x)
    sat = chroma / torch.where(value > 0, value, torch.ones_like(value))
    return torch.stack([torch.remainder(hue6 / 6.0, 1.0), sat, value], dim=1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) HSV in [0, 1] -> RGB (B, 3, H, W) in [0, 1]."""
    hue, sat, value = hsv.unbind(1)
    return _rgb_from_hue6(hue * 6.0, value, sat * value)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each image's hue by ``shift`` (B,) turns (torchvision's hue factor, in [-0.5, 0.5]);
    saturation and value are kept. Works on value and chroma directly (chroma = S * V), which spares
    the division and multiplication by V that a round trip through ``rgb_to_hsv`` would do."""
    hue6, value, chroma = _hue6_value_chroma(x)
    hue6.add_(shift.to(device=x.device, dtype=x.dtype).view(-1, 1, 1), alpha=6.0)
    return _rgb_from_hue6(hue6, value, chroma)
