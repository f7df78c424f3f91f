"""Benchmark of the multi-crop data pipeline on real-sized JPEGs (generated, ImageNet-like 500x375):
images/s of decode + augmentation in one process (what one loader worker delivers), and through the
DataLoader with several workers, to set against the training step's images/s.

``python -m bench.data_pipeline --images 64 --workers 0 2`` prints a table and writes
bench/results/data_pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from dino_train.data import MultiCropAugmentation, build_pretrain_loader
from dino_train.data.datasets import load_rgb

RESULTS = Path(__file__).resolve().parent / "results"


def make_jpegs(folder: Path, n: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> list[Path]:
    """Photo-like JPEGs (smooth gradients, shapes, noise) so decode cost and file size are realistic."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        base = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize(size, Image.BICUBIC)
        draw = ImageDraw.Draw(img)
        for _ in range(8):
            x, y = rng.integers(0, size[0]), rng.integers(0, size[1])
            r = int(rng.integers(10, 80))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        noise = rng.normal(0, 12, (size[1], size[0], 3))
        img = Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8)).filter(
            ImageFilter.SMOOTH
        )
        path = folder / f"{i:05d}.jpg"
        img.save(path, quality=90)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--local-crops", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--json", type=Path, default=RESULTS / "data_pipeline.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # loader work is per process; keep the measurement to one core each
    aug = MultiCropAugmentation(args.global_size, (0.4, 1.0), args.local_crops, args.local_size, (0.05, 0.4))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), args.images)
        t = time.perf_counter()
        imgs = [load_rgb(path) for path in paths]
        decode = len(paths) / (time.perf_counter() - t)
        t = time.perf_counter()
        for img in imgs:
            aug(img)
        augment = len(imgs) / (time.perf_counter() - t)
        rows.append({"what": "decode only, 1 process", "images_per_s": decode})
        rows.append({"what": "multi-crop only, 1 process", "images_per_s": augment})
        rows.append(
            {"what": "decode + multi-crop, 1 process", "images_per_s": 1 / (1 / decode + 1 / augment)}
        )
        for workers in args.workers:
            loader, sampler = build_pretrain_loader(tmp, aug, args.batch, workers, 0, 0, 1, False)
            t = time.perf_counter()
            n = sum(len(labels) for _, labels, _ in loader)
            rows.append(
                {"what": f"DataLoader, {workers} workers", "images_per_s": n / (time.perf_counter() - t)}
            )
    crops = f"2x{args.global_size}+{args.local_crops}x{args.local_size}"
    print(f"multi-crop {crops} on {args.images} JPEGs of 500x375")
    print(f"{'pipeline':<34}{'images/s':>10}")
    for r in rows:
        print(f"{r['what']:<34}{r['images_per_s']:>10.1f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {"crops": crops, "cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg()}
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
