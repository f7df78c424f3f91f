"""The backgrounds of the embedded set's version 2 and 3 (``embedded_objects``), and the drawing helpers
both use. A background is drawn from one of three families that no object class uses; nothing in it
depends on the class, only its luma band on the polarity (itself drawn independently of the class).

Version 2 draws every image's background anew. Version 3 takes it from a pool of ``pool`` per polarity
shared by every class and split, as photographs taken in a few places: background ``k`` is drawn from its
own seed, so the pool costs nothing to hold. Why: with backgrounds drawn per image, the background was the
best cue for telling two images apart, and DINO's CLS attention went to it (docs/experiments.md).
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw

# Background luma band when the object will be brighter / darker: room for the full gap either way.
_BAND = {True: (15.0, 160.0), False: (95.0, 240.0)}
_LUMA = np.array([0.299, 0.587, 0.114])


def tint(luma: np.ndarray, hue: float, sat: float) -> np.ndarray:
    """(..., 3) RGB with exactly ``luma`` (Rec. 601) and the given hue; the chroma ``sat`` asks for is cut
    to what the gamut allows at that luma, so the luminance, which the contrast guarantee is about, holds."""
    d = np.array(colorsys.hsv_to_rgb((hue % 360.0) / 360.0, 1.0, 1.0)) - 0.5
    d = d - d @ _LUMA  # a zero-luma offset of that hue: adding it changes the colour only
    d /= np.abs(d).max()
    luma = np.clip(luma, 0.0, 255.0)
    # The channel with the largest positive (negative) offset is the first to leave [0, 255].
    room = np.minimum((255.0 - luma) / max(d.max(), 1e-6), luma / max(-d.min(), 1e-6))
    return luma[..., None] + np.minimum(sat * 110.0, room)[..., None] * d


def resize_field(field: np.ndarray, shape: tuple[int, int], method: int = Image.BICUBIC) -> np.ndarray:
    img = Image.fromarray(field.astype(np.float32), "F").resize((shape[1], shape[0]), method)
    return np.asarray(img, dtype=np.float64)


def noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Smooth value noise in [0, 1] of ``shape``: a random (cells+1)^2 grid upsampled bicubically."""
    return np.clip(resize_field(rng.random((cells + 1, cells + 1)), shape), 0.0, 1.0)


def polygon_mask(points: np.ndarray, side: int) -> np.ndarray:
    img = Image.new("L", (side, side), 0)
    ImageDraw.Draw(img).polygon([(float(x), float(y)) for x, y in points], fill=255)
    return np.asarray(img) > 0


def _draw(rng: np.random.Generator, n: int, brighter: bool) -> tuple[np.ndarray, np.ndarray]:
    """(luma (n, n), RGB (n, n, 3)) from one of three families that no class uses; nothing here depends
    on the class: only the luma band depends on the polarity, itself drawn independently of it."""
    family = int(rng.integers(3))
    yy, xx = np.mgrid[0:n, 0:n] / n
    if family == 0:  # smooth gradient, linear or radial, two colours mixed along another direction
        a, b = rng.uniform(0, 2 * math.pi, size=2)
        ramp = xx * math.cos(a) + yy * math.sin(a)
        luma = -np.hypot(xx - rng.random(), yy - rng.random()) if rng.random() < 0.5 else ramp
        luma = luma + 0.06 * noise(rng, (n, n), 6)
        mix = 0.5 + (xx - 0.5) * math.cos(b) + (yy - 0.5) * math.sin(b)
    elif family == 1:  # multi-scale noise clutter: the octaves' weights differ per image
        weights = rng.dirichlet(np.ones(4))
        luma = sum(w * noise(rng, (n, n), c) for w, c in zip(weights, (2, 4, 8, 16), strict=True))
        mix = noise(rng, (n, n), 3)
    else:  # fragments: noise-textured patches of random size, level and colour, blurred by resampling
        luma, mix = 0.5 * noise(rng, (n, n), 2), noise(rng, (n, n), 2)
        for _ in range(int(rng.integers(3, 8))):
            centre, radius = rng.random(2) * n, rng.uniform(0.12, 0.35) * n
            angles = np.sort(rng.uniform(0, 2 * math.pi, size=int(rng.integers(3, 7))))
            corners = np.stack([np.cos(angles), np.sin(angles)], 1) * rng.uniform(0.5, 1.0, (len(angles), 1))
            patch = polygon_mask(centre + corners * radius, n)
            texture = rng.uniform(0.0, 0.6) + 0.4 * noise(rng, (n, n), int(rng.integers(6, 20)))
            luma, mix = np.where(patch, texture, luma), np.where(patch, rng.random(), mix)
        luma, mix = (resize_field(resize_field(f, (n // 4, n // 4), Image.BOX), (n, n)) for f in (luma, mix))
    (low, high), width = _BAND[brighter], rng.uniform(50.0, 125.0)
    luma = rng.uniform(low, high - width) + width * (luma - luma.min()) / max(np.ptp(luma), 1e-6)
    hue_a, hue_b, sat = *rng.uniform(0, 360, size=2), rng.uniform(0.05, 0.6)
    mix = np.clip(mix, 0.0, 1.0)[..., None]
    return luma, tint(luma, hue_a, sat) * (1.0 - mix) + tint(luma, hue_b, sat) * mix


_POOL_SEED = 3  # the pool's backgrounds are the same in every data set of one pool size


def background(
    rng: np.random.Generator, n: int, brighter: bool, pool: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(luma (n, n), RGB (n, n, 3)): drawn from ``rng`` (``pool`` 0), or the pool's background number
    ``rng.integers(pool)`` of this polarity."""
    if pool <= 0:
        return _draw(rng, n, brighter)
    k = int(rng.integers(pool))
    return _draw(np.random.default_rng([_POOL_SEED, k, int(brighter)]), n, brighter)
