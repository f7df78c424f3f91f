"""The "embedded default" data set: synthetic shapes and textures, generated deterministically on the fly.

Ten classes (five filled shapes, a ring, a hexagon and three periodic textures) are drawn with
multi-coloured foreground and background fields from one shared distribution (one bright, one dark), pixel
noise, and random position, scale and rotation, so neither colour nor position identifies the class: a model
must learn shape and texture. Colours also vary across each image, so two crops of one image share its
shape rather than a colour signature, which self-supervised training would otherwise latch on to. Shapes
are kept large and near the centre so a 40%-area crop still shows the class.

Layout written by :func:`generate_embedded_dataset`::

    root/train/<class>/<i:05d>.png, root/val/<class>/<i:05d>.png, root/manifest.json,
    root/val_masks/<shape class>/<i:05d>.png (the object mask of each val image of a shape class)

``version=2`` writes the object-centric set of ``dino_train.data.embedded_objects`` (docs/embedded-data.md)
in the same layout, with a label map (0 background, 1, 2 one id per object) for every val image;
``version=3`` the same objects, larger, on backgrounds from a pool shared by every class; ``version=4``
version 3 with objects larger still.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dino_train.data.embedded_objects import OBJECT_CLASSES, STYLES, render_objects
from dino_train.runtime.files import write_json

FORMAT_VERSION = 3  # 3: val_masks/ holds the object masks of the shape classes' val images
EMBEDDED_CLASSES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "ring", "hexagon", "stripes", "checkerboard", "dots",
)  # fmt: skip
VERSIONS = (1, 2, 3, 4)
# What the demos and `--version`'s default generate (issue 31). Version 1 stays for the old numbers.
DEFAULT_VERSION = 4
_GENERATOR = "dino_train.data.embedded"
_SPLITS = ("train", "val")
_SUPERSAMPLE = 2  # masks are drawn at 2x and box-downsampled: cheap anti-aliasing of edges
_MIN_LUMA_GAP = 60.0  # foreground/background luminance gap, so shapes survive RandomGrayscale


def _polygon(cx: float, cy: float, radii: Sequence[float], angles: Sequence[float], rot: float) -> list:
    return [
        (cx + r * math.cos(a + rot), cy + r * math.sin(a + rot)) for r, a in zip(radii, angles, strict=False)
    ]


def _shape_mask(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One filled shape as a uint8 mask (size, size), 255 inside; ``size`` is the supersampled side."""
    cx, cy = rng.uniform(0.36, 0.64, size=2) * size  # near the centre: a 40%-area crop still sees most of it
    r = rng.uniform(0.24, 0.36) * size  # circumradius in pixels
    rot = rng.uniform(0.0, 2.0 * math.pi)
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    if name == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif name == "ring":
        inner = r * rng.uniform(0.5, 0.65)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif name in ("square", "triangle", "hexagon"):
        n = {"square": 4, "triangle": 3, "hexagon": 6}[name]
        scale = {"square": 1.0, "triangle": 1.15, "hexagon": 1.0}[name]  # equalise visual area a little
        angles = [2.0 * math.pi * k / n for k in range(n)]
        draw.polygon(_polygon(cx, cy, [r * scale] * n, angles, rot), fill=255)
    elif name == "star":
        angles = [math.pi * k / 5 for k in range(10)]
        radii = [r * 1.1 if k % 2 == 0 else r * 0.45 for k in range(10)]
        draw.polygon(_polygon(cx, cy, radii, angles, rot), fill=255)
    elif name == "cross":
        w = 0.33 * r  # arm half-width
        local = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r)]
        local += [(-x, -y) for x, y in local]  # point-symmetric second half closes the outline
        pts = [(math.hypot(x, y), math.atan2(y, x)) for x, y in local]
        draw.polygon(_polygon(cx, cy, [p[0] for p in pts], [p[1] for p in pts], rot), fill=255)
    else:
        raise ValueError(f"unknown shape class {name!r}")
    return np.asarray(img)


def _texture_mask(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A full-image periodic texture at a random angle/phase/period; uint8 mask (size, size)."""
    scale = size / (64 * _SUPERSAMPLE)  # periods are specified for a 64 px image
    rot = rng.uniform(0.0, math.pi)
    phase_u, phase_v = rng.uniform(0.0, 1.0, size=2)
    coords = np.arange(size, dtype=np.float64)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    u = xx * math.cos(rot) + yy * math.sin(rot)
    v = -xx * math.sin(rot) + yy * math.cos(rot)
    if name == "stripes":
        period = rng.uniform(9.0, 16.0) * _SUPERSAMPLE * scale
        mask = np.mod(u / period + phase_u, 1.0) < 0.5
    elif name == "checkerboard":
        cell = rng.uniform(6.0, 11.0) * _SUPERSAMPLE * scale
        mask = (np.floor(u / cell + phase_u) + np.floor(v / cell + phase_v)) % 2 == 0
    elif name == "dots":
        period = rng.uniform(9.0, 14.0) * _SUPERSAMPLE * scale
        radius = rng.uniform(0.22, 0.32)  # in periods
        du = np.mod(u / period + phase_u, 1.0) - 0.5
        dv = np.mod(v / period + phase_v, 1.0) - 0.5
        mask = du * du + dv * dv < radius * radius
    else:
        raise ValueError(f"unknown texture class {name!r}")
    return mask.astype(np.uint8) * 255


_TEXTURES = frozenset({"stripes", "checkerboard", "dots"})
SHAPE_CLASSES = tuple(c for c in EMBEDDED_CLASSES if c not in _TEXTURES)  # the classes with an object
MASKS = "val_masks"  # root/val_masks/<shape class>/<i>.png: each val image's object mask (255 inside)


def _colour_field(
    rng: np.random.Generator, size: int, luma: tuple[float, float], grid: int = 4
) -> np.ndarray:
    """(size, size, 3) float colours varying smoothly over the image: a grid x grid of random colours with
    luminance in ``luma``, upsampled bicubically. Colours change from region to region, so two crops of one
    image do not share one colour signature: what they share is the shape or texture."""
    cells = rng.integers(0, 256, size=(grid, grid, 3)).astype(np.float64)
    target = rng.uniform(*luma, size=(grid, grid, 1))
    cells += target - (cells @ np.array([0.299, 0.587, 0.114]))[..., None]
    coarse = Image.fromarray(np.clip(cells, 0, 255).astype(np.uint8), "RGB")
    return np.asarray(coarse.resize((size, size), Image.BICUBIC), dtype=np.float64)


def render_image(class_name: str, rng: np.random.Generator, image_size: int) -> Image.Image:
    """Render one RGB image (image_size x image_size) of ``class_name`` using only ``rng`` for randomness."""
    return render(class_name, rng, image_size)[0]


def render(class_name: str, rng: np.random.Generator, image_size: int) -> tuple[Image.Image, np.ndarray]:
    """The image of ``render_image`` and its object mask (image_size, image_size) bool: the shape's pixels
    (more than half covered), or the texture's foreground."""
    # Foreground and background are multi-coloured fields on opposite sides of a luminance gap (which one is
    # the brighter is random), so the shape survives grayscale and colour jitter but colour says nothing.
    dark, bright = (20.0, 110.0), (110.0 + _MIN_LUMA_GAP, 240.0)
    fg_luma, bg_luma = (bright, dark) if rng.random() < 0.5 else (dark, bright)
    background = _colour_field(rng, image_size, bg_luma)
    fg = _colour_field(rng, image_size, fg_luma)
    side = image_size * _SUPERSAMPLE
    draw_mask: Callable[[str, np.random.Generator, int], np.ndarray]
    draw_mask = _texture_mask if class_name in _TEXTURES else _shape_mask
    big = Image.fromarray(draw_mask(class_name, rng, side), "L")
    alpha = np.asarray(big.resize((image_size, image_size), Image.BOX), dtype=np.float64)[..., None] / 255.0
    pixels = background * (1.0 - alpha) + fg * alpha
    pixels += rng.normal(0.0, 6.0, size=pixels.shape)  # sensor-like noise so no region is perfectly flat
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    return image, alpha[..., 0] > 0.5


def classes_for(version: int) -> tuple[str, ...]:
    """The class names of data set ``version``: 1 the shapes and textures above, 2-4 the objects'."""
    if version not in VERSIONS:
        raise ValueError(f"unknown embedded data set version {version}; expected one of {VERSIONS}")
    return EMBEDDED_CLASSES if version == 1 else OBJECT_CLASSES


def _manifest(image_size: int, train_per_class: int, val_per_class: int, seed: int, version: int) -> dict:
    # Version 1's manifest has no "version" key, so its files stay byte-identical to earlier releases'.
    extra = {} if version == 1 else {"version": version}
    return {
        "generator": _GENERATOR,
        "format_version": FORMAT_VERSION,
        "image_size": image_size,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "seed": seed,
        "classes": list(classes_for(version)),
        **extra,
    }


def _expected_files(root: Path, manifest: dict) -> list[Path]:
    counts = {"train": manifest["train_per_class"], "val": manifest["val_per_class"]}
    classes = classes_for(manifest.get("version", 1))
    images = [root / s / c / f"{i:05d}.png" for s in _SPLITS for c in classes for i in range(counts[s])]
    masked = SHAPE_CLASSES if manifest.get("version", 1) == 1 else classes
    masks = [root / MASKS / c / f"{i:05d}.png" for c in masked for i in range(counts["val"])]
    return images + masks


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _is_complete(root: Path, manifest: dict) -> bool:
    return _read_manifest(root) == manifest and all(p.is_file() for p in _expected_files(root, manifest))


def generate_embedded_dataset(
    root: str | Path,
    image_size: int = 64,
    train_per_class: int = 200,
    val_per_class: int = 50,
    seed: int = 0,
    version: int = DEFAULT_VERSION,
) -> Path:
    """Write the embedded data set under ``root`` (if not already there) and return ``root`` as a Path.

    ``image_size`` is the side in pixels; ``*_per_class`` are image counts per class and split. Same arguments
    give byte-identical PNGs. An existing complete data set with the same parameters is left untouched; one
    with different parameters (ours, per its manifest) is replaced. Anything else at ``root`` is an error,
    so a mistyped path never deletes user data. ``version`` 2-4 are the object-centric sets (every val
    image with a label map); a folder of another version is replaced.
    """
    if image_size < 16 or train_per_class < 1 or val_per_class < 0 or seed < 0:
        raise ValueError(
            f"need image_size >= 16, train_per_class >= 1, val_per_class >= 0, seed >= 0; got "
            f"{image_size=}, {train_per_class=}, {val_per_class=}, {seed=}"
        )
    classes = classes_for(version)
    root = Path(root)
    manifest = _manifest(image_size, train_per_class, val_per_class, seed, version)
    if _is_complete(root, manifest):
        return root
    if root.exists() and not root.is_dir():
        raise FileExistsError(
            f"{root} exists and is not a folder; cannot generate the embedded data set there"
        )
    if root.is_dir() and any(root.iterdir()) and (_read_manifest(root) or {}).get("generator") != _GENERATOR:
        raise FileExistsError(
            f"{root} is a non-empty folder not made by {_GENERATOR}; refusing to replace it"
        )

    root.parent.mkdir(parents=True, exist_ok=True)
    # A unique hidden sibling: same filesystem (so rename is atomic), invisible to ImageDataset scans.
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        for split_idx, split in enumerate(_SPLITS):
            count = train_per_class if split == "train" else val_per_class
            for class_idx, name in enumerate(classes):
                folder = tmp / split / name
                folder.mkdir(parents=True)
                for i in range(count):
                    rng = np.random.default_rng([seed, split_idx, class_idx, i])
                    if version == 1:
                        image, mask = render(name, rng, image_size)
                        labels = mask.astype(np.uint8) * 255 if name in SHAPE_CLASSES else None
                    else:  # label maps by id (1, 2): 255 would read as VOC void beside other ids
                        image, ids = render_objects(class_idx, rng, image_size, STYLES[version])
                        labels = ids.astype(np.uint8)
                    image.save(folder / f"{i:05d}.png", format="PNG")
                    if split == "val" and labels is not None:
                        (tmp / MASKS / name).mkdir(parents=True, exist_ok=True)
                        Image.fromarray(labels, "L").save(tmp / MASKS / name / f"{i:05d}.png")
        # The manifest goes in last: its presence is what marks the data set complete.
        write_json(tmp / "manifest.json", manifest)
        _swap_into_place(tmp, root, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _swap_into_place(tmp: Path, root: Path, manifest: dict) -> None:
    old = None
    if root.exists():
        old = root.parent / f".{root.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(root, old)
    try:
        os.rename(tmp, root)
    except OSError:
        # Another process (e.g. a second rank) finished first; accept its result if it is what we wanted.
        if not _is_complete(root, manifest):
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: ``python -m dino_train.data.embedded --out data/embedded``."""
    parser = argparse.ArgumentParser(description="Generate the synthetic embedded DINO data set.")
    parser.add_argument("--out", default="data/embedded", help="output folder (default: data/embedded)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    help_v = (
        "1 shapes and textures (the demos' until 2026-12-07); 2 object-centric objects; 3 the same on "
        "backgrounds shared by every class; 4 (the default) version 3 with larger objects"
    )
    parser.add_argument("--version", type=int, default=DEFAULT_VERSION, choices=VERSIONS, help=help_v)
    args = parser.parse_args(argv)
    root = generate_embedded_dataset(
        args.out, args.image_size, args.train_per_class, args.val_per_class, args.seed, args.version
    )
    n = len(classes_for(args.version))
    total = n * (args.train_per_class + args.val_per_class)
    print(f"embedded data set v{args.version} ({total} images, {n} classes) at {root.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
