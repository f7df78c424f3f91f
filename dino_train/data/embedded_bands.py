"""An embedded multi-band data set for tests and a short run (``data.channels``): N-band ``.npy`` images,
like a satellite tile, in which a few bands carry the class and the others are noise.

Each image is (channels, size, size) uint16, in per-band units that differ by a factor of up to ~30 (the
offsets and gains below), so that a run which did not normalise per band would be dominated by the
widest band. The class is the shape of one object (disc, square, triangle, ring, cross, ...), drawn at a
random position and size into the first ``informative`` bands, each with its own random contrast, on a
smooth random background; the remaining bands hold smooth fields and noise independent of the class.
Deterministic: the same arguments write the same bytes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from dino_train.data.datasets import DataError

SHAPES = ("disc", "square", "triangle", "ring", "cross", "diamond")
MANIFEST = "manifest.json"
FORMAT = "dino-embedded-bands"
VERSION = 2  # 2: 250 train and 50 val images per class (1: 60 and 25)


def _shape_mask(name: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if name == "disc":
        return dy**2 + dx**2 <= r**2
    if name == "square":
        return (np.abs(dy) <= 0.8 * r) & (np.abs(dx) <= 0.8 * r)
    if name == "triangle":
        return (dy <= 0.7 * r) & (dy >= -r + 2 * np.abs(dx))
    if name == "ring":
        d2 = dy**2 + dx**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if name == "cross":
        return ((np.abs(dy) <= 0.3 * r) & (np.abs(dx) <= r)) | ((np.abs(dx) <= 0.3 * r) & (np.abs(dy) <= r))
    if name == "diamond":
        return np.abs(dy) + np.abs(dx) <= r
    raise ValueError(name)


def _smooth_field(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random low-frequency field in [0, 1]: a sum of a few random planar waves."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    f = np.zeros((size, size))
    for _ in range(3):
        k = rng.uniform(0.5, 2.5, size=2)
        f += np.sin(2 * np.pi * (k[0] * yy + k[1] * xx) + rng.uniform(0, 2 * np.pi))
    return (f - f.min()) / max(f.max() - f.min(), 1e-9)


def make_band_image(
    rng: np.random.Generator, shape: str, channels: int, informative: int, size: int
) -> np.ndarray:
    """One image (channels, size, size) in [0, 1] before the per-band units."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    r = rng.uniform(0.22, 0.36) * size
    cy, cx = rng.uniform(r, size - r, size=2)
    mask = _shape_mask(shape, yy, xx, cy, cx, r).astype(np.float64)
    out = np.empty((channels, size, size))
    for b in range(channels):
        background = 0.3 + 0.4 * _smooth_field(rng, size)
        noise = rng.normal(0.0, 0.03, size=(size, size))
        if b < informative:
            contrast = rng.uniform(0.2, 0.35) * rng.choice([-1.0, 1.0])
            out[b] = background + contrast * mask + noise
        else:
            out[b] = background + rng.normal(0.0, 0.08, size=(size, size))
    return np.clip(out, 0.0, 1.0)


def band_units(channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-band offset and gain (counts = offset + gain * value): spans of ~300 to ~9000 counts."""
    gains = 300.0 * (30.0 ** (np.arange(channels) / max(channels - 1, 1)))
    offsets = 100.0 + 50.0 * np.arange(channels)
    return offsets, gains


def generate_band_dataset(
    root: str | Path,
    channels: int = 6,
    informative: int = 3,
    classes: int = 4,
    train_per_class: int = 250,
    val_per_class: int = 50,
    size: int = 32,
    seed: int = 0,
) -> Path:
    """Write ``root/train/<class>/*.npy`` and ``root/val/<class>/*.npy``; a root that already holds this
    exact set is kept as it is, one holding anything else is an error rather than overwritten."""
    if not 1 <= informative <= channels:
        raise ValueError(f"informative must be in [1, channels={channels}], got {informative}")
    if not 2 <= classes <= len(SHAPES):
        raise ValueError(f"classes must be in [2, {len(SHAPES)}], got {classes}")
    root = Path(root)
    manifest = {"format": FORMAT, "version": VERSION, "channels": channels, "informative": informative,
                "classes": classes, "train_per_class": train_per_class, "val_per_class": val_per_class,
                "size": size, "seed": seed}  # fmt: skip
    found = root / MANIFEST
    if found.is_file():
        try:
            if json.loads(found.read_text()) == manifest:
                return root
        except ValueError:
            pass
        raise DataError(f"{root} holds another data set ({found}); choose another folder or delete it")
    if root.exists() and any(root.iterdir()):
        raise DataError(f"{root} exists and is not empty; choose another folder")
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    offsets, gains = band_units(channels)
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = tmp / split / SHAPES[c]
            folder.mkdir(parents=True)
            for i in range(per_class):
                img = make_band_image(rng, SHAPES[c], channels, informative, size)
                counts = offsets[:, None, None] + gains[:, None, None] * img
                np.save(folder / f"{i:04d}.npy", np.round(counts).astype(np.uint16))
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    root.parent.mkdir(parents=True, exist_ok=True)
    if root.exists():
        root.rmdir()
    tmp.rename(root)  # whole or absent: an interrupted generation leaves only the .partial folder
    return root


def main(argv: list[str] | None = None) -> int:
    """``python -m dino_train.data.embedded_bands [ROOT]``: the set and its train split's statistics."""
    import argparse

    from dino_train.data.bands import BandDataset, compute_band_stats, save_band_stats

    parser = argparse.ArgumentParser(prog="python -m dino_train.data.embedded_bands", description=__doc__)
    parser.add_argument("root", nargs="?", default="data/bands")
    parser.add_argument("--channels", type=int, default=6)
    args = parser.parse_args(argv)
    try:
        root = generate_band_dataset(args.root, channels=args.channels)
    except (DataError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    train = BandDataset(root / "train", args.channels)
    stats, n, _ = compute_band_stats(train[i][0] for i in range(len(train)))
    out = save_band_stats(stats, root / "band_stats.json", {"images": n, "source": str(root / "train")})
    print(f"{root}: train/ and val/ ({len(train)} train images, {args.channels} bands); statistics in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
