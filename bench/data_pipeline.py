"""Benchmark of the multi-crop data pipeline, the release's PIL path against the batched tensor path
(``data.augment_device``), at two shapes: the paper's (2x224 + 10x96 from ImageNet-like 500x375 JPEGs,
generated) and the demo's (2x64 + 4x32 from the embedded set's 64 px PNGs).

Per path: images/s of decoding, of augmentation and of both in one process on one thread, in CPU time
(what one loader worker delivers per core), and through the DataLoader with several workers (wall
time); on a GPU also the tensor path's photometric ops on the device (wall time). ``vs pil`` is the
tensor row over the same PIL row.

``python -m bench.data_pipeline --images 64 --workers 0 2`` prints a table and writes
bench/results/data_pipeline.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from bench.args import RESULTS, add_json, add_workers, write_result
from dino_train.data import (
    MultiCropAugmentation,
    TensorMultiCrop,
    build_pretrain_loader,
    build_tensor_pretrain_loader,
    crops_to_device,
    generate_embedded_dataset,
)
from dino_train.data.datasets import load_rgb
from dino_train.data.loader import collate_augmented_crops, collate_raw_crops
from dino_train.data.tensor_augment import load_rgb_draft

# name -> (crops: global size, scale, local number, local size, scale; the images they come from)
SHAPES = {
    "paper": ((224, (0.4, 1.0), 10, 96, (0.05, 0.4)), "JPEGs of 500x375"),
    "demo": ((64, (0.25, 1.0), 4, 32, (0.05, 0.25)), "PNGs of 64x64"),
}


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


def _images(shape: str, folder: Path, n: int) -> Path:
    """A flat folder of ``n`` images for ``shape``; returns it."""
    if shape == "paper":
        make_jpegs(folder, n)
        return folder
    per_class = -(-n // 10)
    root = generate_embedded_dataset(
        folder / "embedded", 64, train_per_class=per_class, val_per_class=1, version=1
    )
    flat = folder / "flat"
    flat.mkdir()
    for i, p in enumerate(sorted((root / "train").rglob("*.png"))[:n]):
        p.rename(flat / f"{i:05d}.png")
    return flat


def _rate(n: int, fn: Callable[[], object], clock: Callable[[], float] = time.process_time) -> float:
    """Images/s of ``fn`` processing ``n`` images, the best of two runs; by default in this process's
    CPU time (one thread: what a core delivers, even while other work shares the machine)."""
    best = float("inf")
    for _ in range(2):
        t = clock()
        fn()
        best = min(best, clock() - t)
    return n / best


def _per_process(crops: tuple, paths: list[Path], batch: int) -> list[dict]:
    """Decode, augment and both on this process's one thread, for each path."""
    pil, tensor = MultiCropAugmentation(*crops), TensorMultiCrop(*crops)
    full = [load_rgb(p) for p in paths]
    draft = [load_rgb_draft(p, tensor.min_short_side) for p in paths]

    def tensor_augment() -> None:
        for i in range(0, len(draft), batch):
            collate_augmented_crops([(tensor(im), 0, 0) for im in draft[i : i + batch]])

    n = len(paths)
    rates = {
        "pil": (_rate(n, lambda: [load_rgb(p) for p in paths]), _rate(n, lambda: [pil(im) for im in full])),
        "tensor": (
            _rate(n, lambda: [load_rgb_draft(p, tensor.min_short_side) for p in paths]),
            _rate(n, tensor_augment),
        ),
    }
    rows = []
    for path, (decode, augment) in rates.items():
        rows.append({"path": path, "what": "decode, 1 process", "images_per_s": decode})
        rows.append({"path": path, "what": "multi-crop, 1 process", "images_per_s": augment})
        both = 1 / (1 / decode + 1 / augment)
        rows.append({"path": path, "what": "decode + multi-crop, 1 process", "images_per_s": both})
    return rows


def _loader(path: str, crops: tuple, folder: Path, batch: int, workers: int):
    """The training loader of ``path`` (pil or tensor with the photometric ops in the workers)."""
    common = (batch, workers, 0, 0, 1, False)
    if path == "pil":
        return build_pretrain_loader(str(folder), MultiCropAugmentation(*crops), *common)[0]
    return build_tensor_pretrain_loader(str(folder), TensorMultiCrop(*crops), *common, on_device=False)[0]


def _through_loader(crops: tuple, folder: Path, batch: int, workers: list[int]) -> list[dict]:
    rows = []
    for w in workers:
        for path in ("pil", "tensor"):
            loader = _loader(path, crops, folder, batch, w)
            t = time.perf_counter()
            n = sum(len(labels) for _, labels, _ in loader)
            rate = n / (time.perf_counter() - t)
            rows.append({"path": path, "what": f"DataLoader, {w} workers", "images_per_s": rate})
    return rows


def _on_gpu(crops: tuple, paths: list[Path], batch: int) -> list[dict]:
    """The photometric ops of one batch of RawCrops on the GPU (the ``cuda`` path's device share)."""
    tensor = TensorMultiCrop(*crops)
    images = [load_rgb_draft(p, tensor.min_short_side) for p in paths[:batch]]
    raw, _, _ = collate_raw_crops([(tensor(im), 0, 0) for im in images])
    device = torch.device("cuda")
    raw = [c.to(device) for c in raw]

    def run() -> None:
        for _ in range(10):
            crops_to_device(raw, device)
        torch.cuda.synchronize()

    run()  # warm-up: kernels, allocator
    rate = _rate(10 * len(images), run, time.perf_counter)  # wall time: the device's work
    return [{"path": "tensor", "what": "photometric on cuda", "images_per_s": rate}]


def _with_speedups(rows: list[dict]) -> list[dict]:
    """``vs_pil``: a tensor row's images/s over the PIL row of the same shape and measure."""
    pil = {(r["shape"], r["what"]): r["images_per_s"] for r in rows if r["path"] == "pil"}
    for r in rows:
        base = pil.get((r["shape"], r["what"]))
        r["vs_pil"] = r["images_per_s"] / base if base else None
    return rows


def run_shape(shape: str, args: argparse.Namespace) -> list[dict]:
    crops, _ = SHAPES[shape]
    with tempfile.TemporaryDirectory() as tmp:
        folder = _images(shape, Path(tmp), args.images)
        paths = sorted(folder.iterdir())
        rows = _per_process(crops, paths, args.batch)
        rows += _through_loader(crops, folder, args.batch, args.workers)
        if torch.cuda.is_available():
            rows += _on_gpu(crops, paths, args.batch)
    for r in rows:
        r["shape"] = shape
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'shape':<7}{'path':<8}{'measure (1 process: CPU time)':<33}{'images/s':>10}{'vs pil':>8}")
    for r in rows:
        vs = f"{r['vs_pil']:.2f}x" if r["vs_pil"] and r["path"] != "pil" else ""
        print(f"{r['shape']:<7}{r['path']:<8}{r['what']:<33}{r['images_per_s']:>10.1f}{vs:>8}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    add_workers(p)
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    add_json(p, RESULTS / "data_pipeline.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # loader work is per process; keep the measurement to one core each
    rows = _with_speedups([r for shape in args.shapes for r in run_shape(shape, args)])
    for shape in args.shapes:
        crops, images = SHAPES[shape]
        print(f"{shape}: 2x{crops[0]} + {crops[2]}x{crops[3]} from {args.images} {images}")
    print_table(rows)
    meta = {
        "shapes": {s: f"2x{SHAPES[s][0][0]}+{SHAPES[s][0][2]}x{SHAPES[s][0][3]}" for s in args.shapes},
        "images": args.images,
        "batch": args.batch,
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_avg_at_end": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d"),
    }
    write_result(args.json, {"meta": meta, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
