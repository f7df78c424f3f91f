"""Version 2 of the embedded data set: objects as in object-centric photographs (issue 31).

Version 1 carries the class in the outline alone, on big centred objects coloured like their background.
Here the object's own appearance carries its class: each class is a shape family *and* a surface pattern
with its own two-hue palette, varied within the class. The background, from families no class uses
(gradients, noise clutter, blurred fragments), is drawn without looking at the class; the object is
brighter or darker than its surroundings at random, by a guaranteed luminance gap; size and position vary
widely; some images hold a second, smaller object or an occluder. Design and measurements:
docs/embedded-data.md."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from PIL import Image

from dino_train.data.embedded_backgrounds import background, noise, polygon_mask, tint


class _Kind(NamedTuple):
    shape: str
    pattern: str
    hues: tuple[float, float]  # the palette: the pattern's two hues in degrees, jittered per image
    aspect: tuple[float, float]  # range of the minor/major axis ratio: within-class shape variation


_KINDS: dict[str, _Kind] = {
    "striped_disc": _Kind("disc", "stripes", (0.0, 35.0), (0.7, 1.0)),
    "checkered_square": _Kind("square", "checker", (220.0, 190.0), (0.75, 1.0)),
    "dotted_triangle": _Kind("triangle", "dots", (120.0, 65.0), (0.8, 1.0)),
    "ringed_hexagon": _Kind("hexagon", "rings", (275.0, 310.0), (0.85, 1.0)),
    "spoked_star": _Kind("star", "spokes", (48.0, 20.0), (0.85, 1.0)),
    "zigzag_cross": _Kind("cross", "zigzag", (165.0, 285.0), (0.8, 1.0)),
    "gridded_diamond": _Kind("diamond", "grid", (60.0, 245.0), (0.8, 1.0)),
    "framed_capsule": _Kind("capsule", "frame", (90.0, 10.0), (0.8, 1.0)),
    "wavy_arrow": _Kind("arrow", "wavy", (330.0, 200.0), (0.85, 1.0)),
    "speckled_blob": _Kind("blob", "speckle", (28.0, 145.0), (0.75, 1.0)),
}
OBJECT_CLASSES: tuple[str, ...] = tuple(_KINDS)
_SS = 2  # objects are drawn at 2x and box-downsampled: cheap anti-aliasing of outlines and patterns


class Style(NamedTuple):
    """What versions 2, 3 and 4 differ in (docs/embedded-data.md)."""

    radius: tuple[float, float]  # circumradius / image side, log-uniform
    pool: int  # backgrounds per polarity shared by all images (embedded_backgrounds); 0: one per image
    margin: float = 0.8  # an object's centre lies at least margin x its circumradius inside the frame


# Version 2: sizes that keep the centred prior far below version 1's, a background per image. Version 3:
# backgrounds from a shared pool, and larger objects. Version 4: objects larger still (22.6% of the image
# on average, against 14.4%), which may leave the frame more: DINO's local crops (5-25% of the image) then
# land on the object about as often as on the background, as on object-centric photos, where with small
# objects most of them held background only (docs/experiments.md, "Version 4").
STYLES = {2: Style((0.16, 0.36), 0), 3: Style((0.2, 0.4), 40), 4: Style((0.28, 0.48), 40, 0.6)}
_P_SECOND, _P_OCCLUDER = 0.25, 0.15
_GAP = (60.0, 90.0)  # |object - surroundings| mean luma: visible in greyscale whatever the colours
_OBJECT_LUMA = (35.0, 220.0)  # object mean luma stays here so its pattern's two tones stay in gamut
_Box = tuple[slice, slice]


def _ring(count: int, radius: float | np.ndarray = 1.0, start: float = 0.0) -> np.ndarray:
    t = start + np.arange(count) * 2 * math.pi / count
    return np.stack([radius * np.cos(t), radius * np.sin(t)], 1)


_ARM = [(0.34, 1.0), (0.34, 0.34), (1.0, 0.34), (1.0, -0.34), (0.34, -0.34), (0.34, -1.0)]
_CAPSULE = [(0.55 + 0.45 * math.cos(t), 0.45 * math.sin(t)) for t in np.linspace(-1.57, 1.57, 10)]
_OUTLINES: dict[str, np.ndarray] = {  # circumradius about 1, before aspect and rotation
    "disc": _ring(40),
    "square": np.array([(0.72, 0.72), (-0.72, 0.72), (-0.72, -0.72), (0.72, -0.72)]),
    "triangle": _ring(3, start=-math.pi / 2),
    "hexagon": _ring(6),
    "star": _ring(10, np.array([1.0, 0.45] * 5), -math.pi / 2),
    "cross": np.array(_ARM + [(-x, -y) for x, y in _ARM]),  # point-symmetric second half
    "diamond": np.array([(1.0, 0.0), (0.0, 0.62), (-1.0, 0.0), (0.0, -0.62)]),
    "capsule": np.array(_CAPSULE + [(-x, -y) for x, y in _CAPSULE]),
    "arrow": np.array([(1, 0), (0.15, 0.62), (0.15, 0.24), (-1, 0.24), (-1, -0.24), (0.15, -0.24),
                       (0.15, -0.62)]),
}  # fmt: skip


def _outline(shape: str, rng: np.random.Generator) -> np.ndarray:
    """The unit outline (K, 2) of a shape family; a blob is a new smooth random one (low harmonics)."""
    if shape != "blob":
        return _OUTLINES[shape]
    t = np.arange(24) * 2 * math.pi / 24
    radius = 0.85 + sum(rng.uniform(0.05, 0.14) * np.cos(k * t + rng.uniform(0, 6.3)) for k in (2, 3))
    return _ring(24, radius)


def _pattern(kind: _Kind, u: np.ndarray, v: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    """The two-tone surface pattern (bool: which hue) in the object's own frame: ``u``, ``v`` in pixels
    of a 64 px image from its centre, ``r`` its circumradius in those units. Periods scale with the object
    (a few across it at any size) but never below what 64 px can show. The caller draws "frame"."""
    phase_u, phase_v = rng.random(2)
    period = max(r * rng.uniform(0.42, 0.58), 3.5)
    if kind.pattern == "stripes":
        return np.mod(u / period + phase_u, 1.0) < 0.5
    if kind.pattern == "checker":  # cells of half a period (at least 2.5 px): as many edges as stripes
        c = max(0.55 * period, 2.5)
        return (np.floor(u / c + phase_u) + np.floor(v / c + phase_v)) % 2 == 0
    if kind.pattern == "dots":
        du, dv = np.mod(u / period + phase_u, 1.0) - 0.5, np.mod(v / period + phase_v, 1.0) - 0.5
        return du * du + dv * dv < rng.uniform(0.26, 0.34) ** 2
    if kind.pattern == "rings":
        return np.mod(np.hypot(u, v) / period + phase_u, 1.0) < 0.5
    if kind.pattern == "spokes":
        return np.mod(np.arctan2(v, u) * int(rng.integers(5, 9)) / math.pi + phase_u, 1.0) < 0.5
    if kind.pattern == "zigzag":
        tri = np.abs(np.mod(v / (1.2 * period) + phase_v, 1.0) - 0.5)
        return np.mod((u + 0.7 * period * tri) / period + phase_u, 1.0) < 0.5
    if kind.pattern == "grid":
        width = rng.uniform(0.28, 0.36)
        return (np.mod(u / period + phase_u, 1.0) < width) | (np.mod(v / period + phase_v, 1.0) < width)
    if kind.pattern == "wavy":
        wave = 0.35 * period * np.sin(2 * math.pi * (v / (1.6 * period) + phase_v))
        return np.mod((u + wave) / period + phase_u, 1.0) < 0.5
    if kind.pattern == "speckle":
        cell, table = max(0.2 * r, 1.5), rng.random((32, 32)) < rng.uniform(0.3, 0.5)
        return table[np.floor(u / cell).astype(int) % 32, np.floor(v / cell).astype(int) % 32]
    raise ValueError(f"unknown pattern {kind.pattern!r}")


class _Layer(NamedTuple):
    mask: np.ndarray  # (side, side) bool at the supersampled size
    box: _Box  # the mask's bounding box: colours are only computed there
    rgb: np.ndarray  # (box height, box width, 3) float
    object_id: int  # 0 for a distractor: no class's object
    luma: float  # the mean luma it was given


def _bounds(points: np.ndarray, side: int) -> _Box:
    lo = np.clip(np.floor(points.min(0)).astype(int), 0, side)
    hi = np.clip(np.ceil(points.max(0)).astype(int) + 1, 0, side)
    return slice(lo[1], hi[1]), slice(lo[0], hi[0])


def _object(
    class_index: int, rng: np.random.Generator, centre: np.ndarray, r: float, brighter: bool,
    bg_luma: np.ndarray, taken: np.ndarray, object_id: int,
) -> _Layer:  # fmt: skip
    """One object of class ``class_index``: circumradius ``r`` (supersampled pixels) at ``centre``."""
    kind, side = _KINDS[OBJECT_CLASSES[class_index]], bg_luma.shape[0]
    rot, aspect = rng.uniform(0, 2 * math.pi), rng.uniform(*kind.aspect)
    rotation = np.array([[math.cos(rot), -math.sin(rot)], [math.sin(rot), math.cos(rot)]])
    points = centre + (_outline(kind.shape, rng) * np.array([1.0, aspect])) @ rotation.T * r
    mask = polygon_mask(points, side)
    # Surroundings: the background in the annulus just outside the circumcircle, other objects left out.
    near = _bounds(np.stack([centre - 1.45 * r, centre + 1.45 * r]), side)
    yy, xx = np.mgrid[near] + 0.5
    dist = np.hypot(xx - centre[0], yy - centre[1])
    ring = (dist >= r) & (dist < 1.45 * r) & ~taken[near]
    local = float(bg_luma[near][ring].mean()) if ring.any() else float(bg_luma.mean())
    box = _bounds(points, side)
    yy, xx = np.mgrid[box] + 0.5
    dx, dy, unit = xx - centre[0], yy - centre[1], side / 64.0  # patterns are set for a 64 px image
    turn = rot + (0.0 if kind.pattern in ("rings", "spokes") else rng.uniform(0, math.pi))
    u = (dx * math.cos(turn) + dy * math.sin(turn)) / unit
    v = (-dx * math.sin(turn) + dy * math.cos(turn)) / unit
    if kind.pattern == "frame":  # the rim: outside the outline shrunk about the centre
        inner = centre + (points - centre) * rng.uniform(0.6, 0.72)
        tone = mask[box] & ~polygon_mask(inner, side)[box]
    else:
        tone = _pattern(kind, u, v, r / unit, rng)
    # Polarity: the mean luma sits a guaranteed gap above or below the surroundings'; a side the gamut
    # cannot give the full gap flips (the main object's band always has room: only a second one can).
    gap = rng.uniform(*_GAP)
    target = float(np.clip(local + (gap if brighter else -gap), *_OBJECT_LUMA))
    if abs(target - local) < 50.0:
        target = float(np.clip(local + (-gap if brighter else gap), *_OBJECT_LUMA))
    spread = rng.uniform(12.0, 25.0) * rng.choice([-1.0, 1.0])  # the two tones: either the brighter
    shade = rng.uniform(-8.0, 8.0) * (u * math.cos(rot) + v * math.sin(rot)) / max(r / unit, 1.0)
    luma = target + spread * np.where(tone, 1.0, -1.0) + shade
    inside = mask[box]
    luma += target - float(luma[inside].mean()) if inside.any() else 0.0
    sat, hue_a, hue_b = rng.uniform(0.5, 0.95), *(np.array(kind.hues) + rng.uniform(-12, 12, size=2))
    rgb = np.where(tone[..., None], tint(luma, hue_a, sat), tint(luma, hue_b, sat))
    return _Layer(mask, box, rgb, object_id, target)


def _occluder(rng: np.random.Generator, centre: np.ndarray, r: float, main: _Layer, side: int) -> _Layer:
    """A bar or a blob of plain noise texture (no class's appearance) over part of the main object: the
    first of 4 tries that hides 10-45% of it (else the last); its luma 45 or more from the object's, so
    the occluding edge shows."""
    for _ in range(4):
        phi, spin = rng.uniform(0, 2 * math.pi, size=2)
        if rng.random() < 0.5:  # a bar across the object, off its centre
            shape = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]]) * [1.6, rng.uniform(0.2, 0.35)]
        else:  # a blob over its rim
            shape = _ring(20) * [1.0, rng.uniform(0.6, 1.0)] * rng.uniform(0.45, 0.75)
        spin_m = np.array([[math.cos(spin), -math.sin(spin)], [math.sin(spin), math.cos(spin)]])
        offset = centre + rng.uniform(0.5, 1.0) * r * np.array([math.cos(phi), math.sin(phi)])
        points = offset + shape @ spin_m.T * r
        mask = polygon_mask(points, side)
        if 0.1 <= (mask & main.mask).sum() / max(int(main.mask.sum()), 1) <= 0.45:
            break
    level = rng.uniform(20.0, 235.0)
    if abs(level - main.luma) < 45.0:  # away from the object's luma, to whichever side has room
        level = main.luma + 45.0 if main.luma + 45.0 <= 235.0 else main.luma - 45.0
    box = _bounds(points, side)
    luma = level + 30.0 * (noise(rng, mask[box].shape, int(rng.integers(2, 6))) - 0.5)
    return _Layer(mask, box, tint(luma, rng.uniform(0, 360), rng.uniform(0.0, 0.5)), 0, level)


def _place(
    rng: np.random.Generator, side: int, r: float, avoid: np.ndarray | None, margin: float = 0.8
) -> np.ndarray:
    """A centre for circumradius ``r`` at least ``margin * r`` inside the image (0.8: its circumcircle
    mostly inside); with ``avoid`` (another object's centre), the farthest of 8 tries from it."""
    tries = rng.uniform(margin * r, side - margin * r, size=(1 if avoid is None else 8, 2))
    return tries[0 if avoid is None else int(np.argmax(np.hypot(*(tries - avoid).T)))]


def render_objects(
    class_index: int, rng: np.random.Generator, image_size: int, style: Style = STYLES[2]
) -> tuple[Image.Image, np.ndarray]:
    """One RGB image (image_size x image_size) whose main object is of class ``class_index`` (an index
    into ``OBJECT_CLASSES``) and its label map (image_size, image_size) int64: 0 background (distractor
    included), 1 the main object, 2 a second object when there is one. Labels are the visible pixels
    (more than half covered): occluded parts are not the object's. Only ``rng`` gives randomness."""
    if not 0 <= class_index < len(OBJECT_CLASSES):
        raise ValueError(f"class_index must be in [0, {len(OBJECT_CLASSES)}); got {class_index}")
    side, brighter = image_size * _SS, bool(rng.random() < 0.5)
    # The background is smooth: drawn at 1x, repeated to 2x, so the final box filter gives it back exactly.
    luma_1x, rgb_1x = background(rng, image_size, brighter, style.pool)
    bg_luma, rgb = (np.repeat(np.repeat(a, _SS, 0), _SS, 1) for a in (luma_1x, rgb_1x))
    r = side * math.exp(rng.uniform(*np.log(style.radius)))
    centre = _place(rng, side, r, None, style.margin)
    layers: list[_Layer] = []
    taken = np.zeros((side, side), dtype=bool)  # pixels of objects already placed
    if rng.random() < _P_SECOND:  # drawn first: behind the main object where they meet
        other = (class_index + int(rng.integers(1, len(OBJECT_CLASSES)))) % len(OBJECT_CLASSES)
        r2 = max(r * rng.uniform(0.55, 0.8), 0.1 * side)
        c2 = _place(rng, side, r2, centre, style.margin)
        layers.append(_object(other, rng, c2, r2, bool(rng.random() < 0.5), bg_luma, taken, 2))
        taken = layers[-1].mask
    layers.append(_object(class_index, rng, centre, r, brighter, bg_luma, taken, 1))
    if rng.random() < _P_OCCLUDER:
        layers.append(_occluder(rng, centre, r, layers[-1], side))
    ids = np.zeros((side, side), dtype=np.int64)
    for layer in layers:  # later layers cover earlier ones, in the image and in the label map
        rgb[layer.box] = np.where(layer.mask[layer.box][..., None], layer.rgb, rgb[layer.box])
        ids[layer.mask] = layer.object_id
    n = image_size  # back to image_size by each _SS x _SS block's mean (a box filter), labels too
    out = rgb.reshape(n, _SS, n, _SS, 3).mean((1, 3))
    out += rng.normal(0.0, 3.0, size=out.shape)  # sensor-like noise: no region is perfectly flat
    labels = np.zeros((n, n), dtype=np.int64)
    for object_id in (1, 2):
        labels[(ids == object_id).reshape(n, _SS, n, _SS).mean((1, 3)) > 0.5] = object_id
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB"), labels
