"""The shards of ``data.format=shards``: which tar files ``data.path`` names, how many samples each holds
(from ``shards.json``, which dino-make-shards writes, else counted from the tar headers), and which
shards each stream reads in each pass over the data."""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import torch
from webdataset.tariterators import base_plus_ext

from dino_train.data.datasets import DataError

INDEX_NAME = "shards.json"  # written by dino-make-shards beside the shards: names, sample counts, classes
INCOMPLETE_NAME = "INCOMPLETE"  # there while dino-make-shards writes the folder (left by a killed run)


@dataclass(frozen=True)
class ShardIndex:
    paths: tuple[Path, ...]
    counts: tuple[int, ...]  # samples per shard
    classes: tuple[str, ...] = ()

    @property
    def samples(self) -> int:
        return sum(self.counts)


def count_samples(path: Path) -> int:
    """Samples (distinct consecutive keys) in one tar shard, from its headers alone."""
    keys, last = 0, None
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                prefix, _ = base_plus_ext(member.name)
                if member.isreg() and prefix is not None and prefix != last:
                    keys, last = keys + 1, prefix
    except (OSError, tarfile.TarError) as err:
        raise DataError(f"shard {path} cannot be read as a tar file: {err}") from err
    return keys


def _shard_files(path: str) -> list[Path]:
    if "{" in path:
        return [Path(p) for p in braceexpand.braceexpand(path)]
    p = Path(path)
    if p.is_dir():
        return sorted(p.glob("*.tar"))
    return [p] if p.suffix == ".tar" else []


def load_shard_index(path: str) -> ShardIndex:
    """The shards ``data.path`` names (a folder of .tar files or a brace pattern such as
    ``/data/in1k/shard-{000000..001281}.tar``) with their sample counts: from the folder's
    ``shards.json`` where it lists them, else counted from the tar headers."""
    files = _shard_files(path)
    if not files:
        raise DataError(f"data path {path} names no .tar shards (a folder of .tar files or a brace pattern)")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DataError(f"data path {path}: shard {missing[0]} does not exist ({len(missing)} missing)")
    if (files[0].parent / INCOMPLETE_NAME).exists():
        raise DataError(
            f"{files[0].parent}: dino-make-shards did not finish writing these shards "
            f"({INCOMPLETE_NAME} is there); run the same command again to redo them"
        )
    listed, sizes, classes = {}, {}, ()
    index_file = files[0].parent / INDEX_NAME
    if index_file.is_file():
        try:
            meta = json.loads(index_file.read_text())
            listed = {e["name"]: int(e["samples"]) for e in meta["shards"]}
            sizes = {e["name"]: int(e["bytes"]) for e in meta["shards"] if "bytes" in e}  # older: none
            classes = tuple(meta.get("classes", ()))
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{index_file} is not a shard index: {type(err).__name__}: {err}") from err
    for f in files:
        if f.name in sizes and f.stat().st_size != sizes[f.name]:
            raise DataError(
                f"shard {f} is {f.stat().st_size} bytes where {index_file} lists {sizes[f.name]}: it changed "
                f"or was cut short after indexing (pack them again, or delete {INDEX_NAME} to count them)"
            )
    counts = [listed[f.name] if f.name in listed else count_samples(f) for f in files]
    kept = [(f, n) for f, n in zip(files, counts, strict=True) if n > 0]
    if not kept:
        raise DataError(f"data path {path}: its {len(files)} shard(s) hold no samples")
    return ShardIndex(tuple(f for f, _ in kept), tuple(n for _, n in kept), classes)


def pass_shards(n_shards: int, seed: int, pass_index: int, stream: int, n_streams: int) -> list[int]:
    """The shards (indices) stream ``stream`` of ``n_streams`` reads in pass ``pass_index``, in order."""
    order = torch.randperm(n_shards, generator=torch.Generator().manual_seed(seed + pass_index)).tolist()
    return order[stream::n_streams]
