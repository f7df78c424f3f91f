"""``dino-data-stats``: the per-band mean and std of a folder of N-band images, for ``data.band_stats``.

    dino-data-stats data/bands/train --channels 6 --out data/bands/band_stats.json
    dino-train --config configs/bands.yaml data.band_stats=data/bands/band_stats.json

Every pixel of every readable file counts once (files that cannot be read are skipped, counted and
named); a band with one value everywhere gets std 1 and a warning, so it normalises to 0. Statistics
come from the training split only, as ImageNet's do.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from dino_train.data.bands import BandDataset, compute_band_stats, save_band_stats
from dino_train.data.datasets import UNREADABLE, DataError


def _images(data: BandDataset, skipped: list[str], progress: bool) -> Iterator[torch.Tensor]:
    start, n = time.monotonic(), len(data.samples)
    for i, (path, _) in enumerate(data.samples):
        try:
            yield data.load(path)
        except UNREADABLE as err:
            skipped.append(f"{path}: {err}")
        if progress and (i + 1) % 500 == 0:
            rate = (i + 1) / max(time.monotonic() - start, 1e-9)
            print(f"  {i + 1}/{n} images ({rate:.0f}/s)", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dino-data-stats", description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="a folder of N-band images (class sub-folders or flat)")
    parser.add_argument("--channels", type=int, required=True, help="bands per image (data.channels)")
    parser.add_argument("--out", required=True, help="the JSON file to write (data.band_stats)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.channels < 1:
        parser.error(f"argument --channels: must be at least 1, got {args.channels}")
    try:
        data = BandDataset(args.data, args.channels)
        skipped: list[str] = []
        stats, n, constant = compute_band_stats(_images(data, skipped, not args.no_progress))
    except DataError as err:
        print(f"dino-data-stats: error: {err}", file=sys.stderr)
        return 2
    for line in skipped[:10]:
        print(f"skipped {line}", file=sys.stderr)
    if constant:
        print(f"warning: band(s) {constant} hold one value everywhere: std set to 1", file=sys.stderr)
    extra = {"images": n, "skipped": len(skipped), "source": str(Path(args.data).resolve())}
    out = save_band_stats(stats, args.out, extra)
    print(f"{n} images, {len(skipped)} skipped, {args.channels} bands -> {out}")
    for b, (m, s) in enumerate(zip(stats.mean, stats.std, strict=True)):
        print(f"  band {b}: mean {m:.6g}  std {s:.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
