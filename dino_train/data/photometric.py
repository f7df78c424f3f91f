"""The release's photometric augmentation, batched over crops: flip, colour jitter in a random order per
image, grayscale, Gaussian blur, solarisation and ImageNet normalisation.

Every random decision is drawn beforehand, per sample, into a parameter row (see ``P_*`` below and
``dino_train.data.tensor_augment``); these functions only apply them, so the result does not depend on
where they run (a loader worker or the GPU) nor on the other images of the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dino_train.data.color import adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, grayscale
from dino_train.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# Columns of a parameter row (float32). Flags are 0/1; P_ORDER..P_ORDER+3 hold the jitter ops' order
# (indices into JITTER_OPS); sigma 0 means no blur.
P_FLIP, P_JITTER, P_BRIGHTNESS, P_CONTRAST, P_SATURATION, P_HUE = 0, 1, 2, 3, 4, 5
P_ORDER = 6
P_GRAY, P_SIGMA, P_SOLARIZE = 10, 11, 12
P_SOLARIZE_AT = 13  # solarisation's threshold in [0, 1]: values at or above it are inverted
N_PARAMS = 14

# torchvision's ColorJitter order index -> (op, parameter column).
JITTER_OPS: tuple[tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], int], ...] = (
    (adjust_brightness, P_BRIGHTNESS),
    (adjust_contrast, P_CONTRAST),
    (adjust_saturation, P_SATURATION),
    (adjust_hue, P_HUE),
)

# PIL's solarize(img, 128) inverts 8-bit values >= 128.
SOLARIZE_THRESHOLD = 128 / 255
# The release's blur radius range (PIL's radius is the Gaussian's standard deviation), in pixels.
BLUR_SIGMA = (0.1, 2.0)
# Kernels reach 3 sigma of the largest sigma (99.7% of the mass), whatever the batch's sigmas: one
# image's blur never depends on which images share its batch.
BLUR_RADIUS = math.ceil(3.0 * BLUR_SIGMA[1])


def _apply(x: torch.Tensor, mask: torch.Tensor, op: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """``x[mask] = op(x[mask])`` in place; ``mask`` (B,) is a CPU bool tensor, so choosing the images
    needs no device synchronisation, and the op only computes the images it changes."""
    idx = mask.nonzero().flatten()
    if idx.numel() == 0:
        return
    if idx.numel() == x.shape[0]:
        x.copy_(op(x))
        return
    idx = idx.to(x.device)
    x.index_copy_(0, idx, op(x.index_select(0, idx)))


def gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels (N, 2 * radius + 1), one per sigma (N,) > 0 (pixels)."""
    t = torch.arange(-radius, radius + 1, dtype=sigma.dtype, device=sigma.device)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int = BLUR_RADIUS) -> torch.Tensor:
    """Blur each image of (N, 3, H, W) with its own sigma (N,) > 0 in pixels: separable grouped
    convolutions over the N * 3 channels with kernels of 2 * radius + 1 taps. Edges are replicated, as
    PIL's box blur extends them.

    PIL's GaussianBlur(radius) approximates a Gaussian of standard deviation ``radius`` by three box
    blurs; this is the Gaussian itself, so the two agree in variance (the measure of blur strength).
    """
    n, c, h, w = x.shape
    k = gaussian_kernels(sigma.to(device=x.device, dtype=x.dtype), radius).repeat_interleave(c, dim=0)
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, k.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def solarize(x: torch.Tensor, threshold: float | torch.Tensor = SOLARIZE_THRESHOLD) -> torch.Tensor:
    """Invert the values at or above ``threshold`` (one value, or one per image (N,)): PIL's
    ``ImageOps.solarize(img, 255 * threshold)``; the default is the release's 128/255, 0 inverts all."""
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.to(x.device, x.dtype).view(-1, 1, 1, 1)
    # x + [x >= t] (1 - 2x): about half the time of torch.where on the CPU.
    invert = x.ge(threshold).to(x.dtype)
    return x.addcmul(invert, x.mul(-2.0).add_(1.0))


def normalize_(x: torch.Tensor) -> torch.Tensor:
    """In place: ImageNet mean and std per channel, as ``T.Normalize`` after ``ToTensor``."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    inv_std = 1.0 / torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return x.sub_(mean).mul_(inv_std)


def color_jitter_(x: torch.Tensor, params: torch.Tensor) -> None:
    """In place: the four jitter ops on the images whose P_JITTER flag is set, in each image's own order
    (step s applies, to every image, the op its order names at position s)."""
    on = params[:, P_JITTER] > 0.5
    order = params[:, P_ORDER : P_ORDER + 4].round().long()
    for step in range(4):
        for op_index, (op, col) in enumerate(JITTER_OPS):
            mask = on & (order[:, step] == op_index)
            factors = params[:, col]
            _apply(x, mask, lambda sub, m=mask, f=factors, fn=op: fn(sub, f[m]))


def photometric(pixels: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """uint8 crops (B, 3, S, S) on any device and their parameter rows (B, N_PARAMS) -> float32 crops
    (B, 3, S, S), augmented and ImageNet-normalised, on the crops' device.

    The order is the release's: flip, colour jitter (random order), grayscale, blur, solarise, normalise.
    """
    params = params.detach().to("cpu", torch.float32)  # decisions on the host: no device sync
    x = pixels.to(torch.float32).mul_(1.0 / 255.0)
    _apply(x, params[:, P_FLIP] > 0.5, lambda sub: sub.flip(-1))
    color_jitter_(x, params)
    _apply(x, params[:, P_GRAY] > 0.5, lambda sub: grayscale(sub).expand_as(sub))
    blur = params[:, P_SIGMA] > 0
    _apply(x, blur, lambda sub: gaussian_blur(sub, params[blur, P_SIGMA]))
    sol = params[:, P_SOLARIZE] > 0.5
    _apply(x, sol, lambda sub: solarize(sub, params[sol, P_SOLARIZE_AT]))
    return normalize_(x)


class RawCrops(NamedTuple):
    """One crop position of a batch before its photometric ops: uint8 ``pixels`` (B, 3, S, S) and
    parameter rows ``params`` (B, N_PARAMS). A named tuple, so the DataLoader pins both."""

    pixels: torch.Tensor
    params: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> RawCrops:
        """The pixels to ``device`` (uint8: a quarter of the float crops' transfer); the parameters stay
        on the host, where :func:`photometric` reads its decisions without waiting for the device."""
        return RawCrops(self.pixels.to(device, non_blocking=non_blocking), self.params)


def finish_crops(crops: Sequence[torch.Tensor | RawCrops]) -> list[torch.Tensor]:
    """The photometric ops of each RawCrops on the device its pixels are on -> float crops (B, 3, S, S);
    finished crops (tensors, from the ``pil`` path) pass through unchanged.

    Positions of one size (the local crops) are augmented as one batch: the same result as one by one
    (each image's ops are its own), in a tenth of the kernel launches on a GPU.
    """
    out: list[torch.Tensor | RawCrops] = list(crops)
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(crops):
        if isinstance(c, RawCrops):
            groups.setdefault((tuple(c.pixels.shape[1:]), c.pixels.device), []).append(i)
    for idx in groups.values():
        raw = [crops[i] for i in idx]
        if len(raw) == 1:
            done = [photometric(raw[0].pixels, raw[0].params)]
        else:
            pixels = torch.cat([r.pixels for r in raw])
            params = torch.cat([r.params for r in raw])
            done = photometric(pixels, params).split([r.pixels.shape[0] for r in raw])
        for i, d in zip(idx, done, strict=True):
            out[i] = d
    return out  # type: ignore[return-value]


def crops_to_device(crops: Sequence[torch.Tensor | RawCrops], device: torch.device) -> list[torch.Tensor]:
    """A loader batch's crops -> finished float crops on ``device``: the transfer (asynchronous from
    pinned memory), then the photometric ops there for RawCrops (``data.augment_device=cuda``)."""
    return finish_crops([c.to(device, non_blocking=True) for c in crops])
