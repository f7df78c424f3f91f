"""``dino-make-shards SRC DST --shard-size N``: pack a folder of images (class folders or flat) into
webdataset tar shards for ``data.format=shards``.

Each file is checked as training would read it (``datasets.load_rgb``); one that does not decode is
skipped, counted and listed in ``DST/skipped.txt``. The files are shuffled once (``--seed``) before
packing, so that a shard mixes classes, then written unchanged (no re-encoding) as ``<key>.<ext>`` with
the class index as ``<key>.cls`` for labelled folders. ``DST/shards.json`` lists every shard with its
sample count, size in bytes and the class names: the reader takes the counts from it instead of scanning
the tars, and refuses a shard whose size is not the one listed (changed or cut short since).

Interrupted (kill -9, a full disk) it leaves ``DST/INCOMPLETE`` beside the shards it had begun: the reader
refuses such a folder, and the same command run again removes what the interrupted run wrote and packs
it anew, to the same bytes as an uninterrupted run (the order is seeded and the tar headers carry no
time).
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from dino_train.data.datasets import UNREADABLE, DataError, ImageDataset, load_rgb
from dino_train.data.shard_index import INCOMPLETE_NAME, INDEX_NAME
from dino_train.runtime.files import atomic_write_text, write_json

SHARD_PATTERN = "shard-%06d.tar"


@dataclass
class PackResult:
    shards: list[tuple[str, int]]  # (file name, samples)
    skipped: list[str]  # "path: error" of each file that did not decode

    @property
    def samples(self) -> int:
        return sum(n for _, n in self.shards)


def check_image(path: Path) -> str | None:
    """None when ``path`` decodes as training reads it, else the reason it does not."""
    try:
        load_rgb(path)
        return None
    except UNREADABLE as err:
        return f"{type(err).__name__}: {err}"


def _checked(paths: list[Path], workers: int) -> Iterator[str | None]:
    if workers <= 1:
        yield from map(check_image, paths)
        return
    with ProcessPoolExecutor(workers) as pool:
        yield from pool.map(check_image, paths, chunksize=64)


def pack_folder(
    src: str | Path, dst: str | Path, shard_size: int, seed: int = 0, workers: int = 1
) -> PackResult:
    """Pack the images under ``src`` into shards of ``shard_size`` samples in ``dst`` (see the module's
    docstring); returns the shards written and the files skipped."""
    data = ImageDataset(src)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    marker = dst / INCOMPLETE_NAME
    if marker.exists():  # an interrupted run of this command: its files are redone, nothing else
        for leftover in [*dst.glob("shard-*.tar"), dst / INDEX_NAME, dst / "skipped.txt"]:
            leftover.unlink(missing_ok=True)
        print(f"{dst}: removed the shards of an interrupted run; packing again", file=sys.stderr)
    elif any(dst.glob("*.tar")) or (dst / INDEX_NAME).exists():
        raise DataError(f"{dst} already holds shards; choose an empty folder")
    atomic_write_text(marker, "dino-make-shards is writing this folder\n")
    samples = list(data.samples)
    random.Random(seed).shuffle(samples)
    per_shard: Counter[str] = Counter()
    skipped = []
    writer = wds.ShardWriter(
        str(dst / SHARD_PATTERN), maxcount=shard_size, maxsize=float("inf"), verbose=0, mtime=0
    )
    try:
        checks = _checked([p for p, _ in samples], workers)
        for n, ((path, label), error) in enumerate(zip(samples, checks, strict=True)):
            if error is not None:
                skipped.append(f"{path}: {error}")
                continue
            sample = {"__key__": f"{n:09d}", path.suffix.lower().lstrip("."): path.read_bytes()}
            if label >= 0:
                sample["cls"] = str(label).encode()
            writer.write(sample)
            per_shard[Path(writer.fname).name] += 1
    finally:
        writer.close()
    shards = sorted(per_shard.items())
    index = {
        "format": "webdataset",
        "shards": [
            {"name": name, "samples": count, "bytes": (dst / name).stat().st_size} for name, count in shards
        ],
        "samples": sum(per_shard.values()),
        "classes": data.classes,
        "skipped": len(skipped),
        "source": str(Path(src).absolute()),
    }
    if skipped:
        atomic_write_text(dst / "skipped.txt", "\n".join(skipped) + "\n")
    write_json(dst / INDEX_NAME, index, indent=1)
    marker.unlink()  # last: until here a reader refuses the folder
    return PackResult(shards, skipped)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dino-make-shards", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "src", type=Path, help="a class-folder data set (ImageFolder layout) or a folder of images"
    )
    p.add_argument("dst", type=Path, help="an empty folder for the shards")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the packing order (default 0)")
    p.add_argument("--workers", type=int, default=1, help="processes checking the images (default 1)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.shard_size < 1:
            raise DataError(f"--shard-size {args.shard_size}: must be at least 1")
        result = pack_folder(args.src, args.dst, args.shard_size, args.seed, args.workers)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    note = f", skipped {len(result.skipped)} unreadable file(s) (listed in {args.dst / 'skipped.txt'})"
    print(
        f"wrote {result.samples} images in {len(result.shards)} shard(s) to {args.dst}"
        + (note if result.skipped else "")
        + f"; train with data.format=shards data.path={args.dst}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
