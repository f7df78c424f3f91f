"""Synthetic videos for video object segmentation: shapes moving over a textured background, with their
true masks, written in the DAVIS 2017 layout so ``eval_video_segmentation`` reads them as it reads DAVIS.

Each object is a filled shape (circle, square, triangle, star) coloured by a smooth multi-colour field on
the opposite side of a luminance gap from the background's (so colour alone does not separate them, but
shape and contrast do), moving at constant speed, bouncing off the borders and rotating; later objects
pass in front of earlier ones. Objects start apart, so each is visible in the first frame's mask.

Layout written by :func:`generate_embedded_videos`::

    root/JPEGImages/480p/<video>/00000.jpg ...     frames (RGB JPEG)
    root/Annotations/480p/<video>/00000.png ...    masks: palette PNGs, 0 background, k object k
    root/ImageSets/2017/val.txt                    video names, one a line
    root/manifest.json                             the arguments (a complete set is not rewritten)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dino_train.runtime.files import write_json

VIDEO_SHAPES = ("circle", "square", "triangle", "star")
RESOLUTION = "480p"  # the DAVIS folder name, whatever the frame size
_GENERATOR = "dino_train.data.embedded_video"
_SUPERSAMPLE = 2  # shapes are drawn at 2x and box-downsampled: anti-aliased frames, sharp masks


def davis_palette() -> list[int]:
    """The 256-colour palette of DAVIS and PASCAL VOC masks (flat RGB list, 768 values): colour k
    spreads the bits of k over the high bits of R, G and B (1 -> dark red, 2 -> dark green, ...)."""
    palette = []
    for k in range(256):
        rgb, c = [0, 0, 0], k
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((c >> channel) & 1) << shift
            c >>= 3
        palette += rgb
    return palette


def _colour_field(rng: np.random.Generator, h: int, w: int, luma: tuple[float, float]) -> np.ndarray:
    """(h, w, 3) float colours varying smoothly over the frame, luminance within ``luma``."""
    cells = rng.integers(0, 256, size=(3, 4, 3)).astype(np.float64)
    target = rng.uniform(*luma, size=(3, 4, 1))
    cells += target - (cells @ np.array([0.299, 0.587, 0.114]))[..., None]
    coarse = Image.fromarray(np.clip(cells, 0, 255).astype(np.uint8), "RGB")
    return np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.float64)


def _shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rot: float) -> None:
    """Draw a filled ``shape`` of circumradius ``r`` px centred at (cx, cy), rotated by ``rot`` rad."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        return
    n, radii = {"square": (4, [r]), "triangle": (3, [r * 1.15]), "star": (10, [r * 1.1, r * 0.5])}[shape]
    points = []
    for k in range(n):
        a = rot + 2.0 * math.pi * k / n
        rk = radii[k % len(radii)]
        points.append((cx + rk * math.cos(a), cy + rk * math.sin(a)))
    draw.polygon(points, fill=255)


def _start(rng: np.random.Generator, count: int, h: int, w: int) -> list[dict]:
    """Objects placed apart from one another (so none hides another in the first frame)."""
    objects: list[dict] = []
    for _ in range(count):
        r = rng.uniform(0.16, 0.22) * min(h, w)
        for _ in range(100):  # rejection sampling; small frames may need a few tries
            cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
            if all(math.hypot(cx - o["x"], cy - o["y"]) > r + o["r"] for o in objects):
                break
        speed = rng.uniform(0.02, 0.05) * min(h, w)  # px per frame
        angle = rng.uniform(0, 2 * math.pi)
        objects.append({"shape": VIDEO_SHAPES[rng.integers(len(VIDEO_SHAPES))], "r": r, "x": cx, "y": cy,
                        "vx": speed * math.cos(angle), "vy": speed * math.sin(angle),
                        "rot": rng.uniform(0, 2 * math.pi), "spin": rng.uniform(-0.1, 0.1)})  # fmt: skip
    return objects


def _move(o: dict, h: int, w: int) -> None:
    """One frame of motion: constant velocity, bouncing off the borders, constant spin."""
    o["x"], o["y"], o["rot"] = o["x"] + o["vx"], o["y"] + o["vy"], o["rot"] + o["spin"]
    if not o["r"] <= o["x"] <= w - o["r"]:
        o["vx"] = -o["vx"]
    if not o["r"] <= o["y"] <= h - o["r"]:
        o["vy"] = -o["vy"]


def render_video(
    rng: np.random.Generator, num_frames: int, height: int, width: int, num_objects: int
) -> tuple[list[Image.Image], list[np.ndarray]]:
    """``num_frames`` RGB frames (width x height) and their label maps (height, width) uint8: 0 for the
    background, k for object k (1-based; a later object covers an earlier one)."""
    dark, bright = (20.0, 100.0), (160.0, 240.0)
    fg, bg = (bright, dark) if rng.random() < 0.5 else (dark, bright)
    background = _colour_field(rng, height, width, bg)
    fills = [_colour_field(rng, height, width, fg) for _ in range(num_objects)]
    objects = _start(rng, num_objects, height, width)
    frames, labels = [], []
    for _ in range(num_frames):
        pixels, label = background.copy(), np.zeros((height, width), dtype=np.uint8)
        for k, (o, fill) in enumerate(zip(objects, fills, strict=True), start=1):
            big = Image.new("L", (width * _SUPERSAMPLE, height * _SUPERSAMPLE), 0)
            s = _SUPERSAMPLE
            _shape(ImageDraw.Draw(big), o["shape"], o["x"] * s, o["y"] * s, o["r"] * s, o["rot"])
            alpha = np.asarray(big.resize((width, height), Image.BOX), dtype=np.float64)[..., None] / 255.0
            pixels = pixels * (1.0 - alpha) + fill * alpha
            label[alpha[..., 0] > 0.5] = k
            _move(o, height, width)
        pixels += rng.normal(0.0, 4.0, size=pixels.shape)
        frames.append(Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB"))
        labels.append(label)
    return frames, labels


def write_mask(path: Path, labels: np.ndarray, palette: list[int] | None = None) -> None:
    """Save (H, W) uint8 labels as a palette PNG, as DAVIS stores its masks."""
    img = Image.fromarray(labels.astype(np.uint8), "P")
    img.putpalette(palette or davis_palette())
    img.save(path, format="PNG")


def _write(tmp: Path, manifest: dict) -> None:
    names = [f"shapes{i:02d}" for i in range(manifest["num_videos"])]
    for i, name in enumerate(names):
        rng = np.random.default_rng([manifest["seed"], i])
        frames, labels = render_video(
            rng, manifest["num_frames"], manifest["height"], manifest["width"], manifest["num_objects"]
        )
        (tmp / "JPEGImages" / RESOLUTION / name).mkdir(parents=True)
        (tmp / "Annotations" / RESOLUTION / name).mkdir(parents=True)
        for t, (frame, label) in enumerate(zip(frames, labels, strict=True)):
            frame.save(tmp / "JPEGImages" / RESOLUTION / name / f"{t:05d}.jpg", quality=95)
            write_mask(tmp / "Annotations" / RESOLUTION / name / f"{t:05d}.png", label)
    (tmp / "ImageSets" / "2017").mkdir(parents=True)
    (tmp / "ImageSets" / "2017" / "val.txt").write_text("".join(f"{n}\n" for n in names))
    write_json(tmp / "manifest.json", manifest)  # last: marks it complete


def generate_embedded_videos(
    root: str | Path,
    num_videos: int = 2,
    num_frames: int = 8,
    height: int = 64,
    width: int = 96,
    num_objects: int = 2,
    seed: int = 0,
) -> Path:
    """Write the videos under ``root`` (unless the same ones are there) and return ``root``. Same
    arguments give the same files. A folder this generator did not make is never replaced."""
    if min(num_videos, num_frames, num_objects) < 1 or min(height, width) < 16 or seed < 0:
        raise ValueError(
            f"need num_videos, num_frames, num_objects >= 1, height and width >= 16, seed >= 0; got "
            f"{num_videos=}, {num_frames=}, {num_objects=}, {height=}, {width=}, {seed=}"
        )
    root = Path(root)
    manifest = {"generator": _GENERATOR, "num_videos": num_videos, "num_frames": num_frames,
                "height": height, "width": width, "num_objects": num_objects, "seed": seed}  # fmt: skip
    try:
        existing = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        existing = None
    if existing == manifest:
        return root
    if (
        root.exists()
        and (not root.is_dir() or any(root.iterdir()))
        and (existing or {}).get("generator") != _GENERATOR
    ):
        raise FileExistsError(f"{root} exists and was not made by {_GENERATOR}; refusing to replace it")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write(tmp, manifest)
        if root.exists():
            shutil.rmtree(root)
        os.rename(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def main(argv: list[str] | None = None) -> int:
    """``python -m dino_train.data.embedded_video --out data/videos``."""
    p = argparse.ArgumentParser(description="Generate synthetic videos with true masks (DAVIS layout).")
    p.add_argument("--out", default="data/videos", help="output folder (default: data/videos)")
    p.add_argument("--num-videos", type=int, default=2)
    p.add_argument("--num-frames", type=int, default=8)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--num-objects", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    root = generate_embedded_videos(
        a.out, a.num_videos, a.num_frames, a.height, a.width, a.num_objects, a.seed
    )
    print(f"{a.num_videos} videos of {a.num_frames} frames ({a.width}x{a.height}) at {root.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
