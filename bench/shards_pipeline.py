"""Folder against shards (``data.format``): images/s per core of the pretraining loader on the same
generated JPEGs (ImageNet-like 500x375), once as a class folder and once packed by dino-make-shards.

Rows per format: reading the raw bytes alone (no decoding: what the format changes), and the whole
loader (read, decode, multi-crop 2x224 + 10x96 on the tensor path with its photometric ops in the
workers, collate) for each worker count. Per core = images/s / max(workers, 1): each worker is a process
on its own core, the main process does the work when there are none.

    python -m bench.shards_pipeline --images 128 --workers 0 2 --json bench/results/shards_pipeline.json

A local disk with the files in the page cache favours the folder; shards pay off where opening a file
costs (network file systems, object stores, spinning disks), which this benchmark does not reproduce.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.args import add_json, add_workers, write_result
from bench.data_pipeline import make_jpegs
from dino_train.data import TensorMultiCrop, build_tensor_pretrain_loader
from dino_train.data.make_shards import pack_folder
from dino_train.data.shard_index import load_shard_index
from dino_train.data.shards import build_shard_loader, raw_samples

CROPS = (224, (0.4, 1.0), 10, 96, (0.05, 0.4))  # the paper's multi-crop


def _rate(n: int, fn) -> float:
    """Images/s of ``fn`` over ``n`` images, the best of two runs (the machine may be shared)."""
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n / best


def _raw_rates(folder: Path, shards: Path, n: int) -> list[dict]:
    files = sorted(folder.rglob("*.jpg"))
    paths = list(load_shard_index(str(shards)).paths)
    folder_rate = _rate(n, lambda: [f.read_bytes() for f in files])
    shards_rate = _rate(n, lambda: sum(1 for _ in raw_samples(paths)))
    return [
        {"format": "folder", "what": "raw bytes", "workers": 0, "images_per_s": folder_rate},
        {"format": "shards", "what": "raw bytes", "workers": 0, "images_per_s": shards_rate},
    ]


def _loader_rate(fmt: str, folder: Path, shards: Path, batch: int, workers: int) -> float:
    if fmt == "folder":
        loader, _ = build_tensor_pretrain_loader(
            str(folder), TensorMultiCrop(*CROPS), batch, workers, 0, 0, 1, False, on_device=False
        )
    else:
        loader, _ = build_shard_loader(str(shards), "cpu", CROPS, batch, workers, 0, 0, 1, False)

    def one_epoch() -> int:
        return sum(len(labels) for _, labels, _ in loader)

    n = one_epoch()  # also warms the page cache for both formats alike
    return _rate(n, one_epoch)


def run(images: int, workers: list[int], batch: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = Path(tmp) / "folder", Path(tmp) / "shards"
        for c in range(4):  # four classes, so the shards carry labels as a class folder does
            (folder / f"class{c}").mkdir(parents=True)
            make_jpegs(folder / f"class{c}", images // 4, seed=c)
        pack_folder(folder, shards, shard_size=max(images // 8, 1))
        rows = _raw_rates(folder, shards, images)
        for w in workers:
            for fmt in ("folder", "shards"):
                rate = _loader_rate(fmt, folder, shards, batch, w)
                rows.append(
                    {"format": fmt, "what": "loader, tensor path", "workers": w, "images_per_s": rate}
                )
    for r in rows:
        r["per_core"] = r["images_per_s"] / max(r["workers"], 1)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=128)
    add_workers(p)
    p.add_argument("--batch", type=int, default=8)
    add_json(p, None)
    args = p.parse_args(argv)
    rows = run(args.images, args.workers, args.batch)
    print(f"{'format':7} {'what':22} {'workers':>7} {'images/s':>9} {'per core':>9}")
    for r in rows:
        print(
            f"{r['format']:7} {r['what']:22} {r['workers']:7d} {r['images_per_s']:9.1f} {r['per_core']:9.1f}"
        )
    if args.json:
        write_result(args.json, {"images": args.images, "batch": args.batch, "rows": rows}, 1, announce=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
