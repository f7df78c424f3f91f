"""Patch tokens of a data set streamed to disk as the batches are embedded, and read back without loading
them: the patch tokens of a large folder do not fit in memory (ImageNet's 1.28 M images at ViT-S/16, 224 px:
1.28 M x 196 x 384 values, 193 GB in float16).

A store is a folder:

- ``patch_tokens.npy``: (N, h*w, D) float16, the final-norm patch tokens, row-major over the h x w grid;
- ``features.npy``: (N, D) float32, the backbone's output (for our ViTs the final-norm CLS token);
- ``labels.npy``: (N,) int64 indexing ``classes`` (-1: unlabelled);
- ``paths.txt``: the image files in row order, when the images came from files;
- ``store.json``: the shapes, the grid (h, w), the patch size, the class names.

The ``.npy`` files are numpy's format (``np.load(f, mmap_mode="r")`` opens them anywhere); ``store.json``
is written last, so a folder without it is an extraction that did not finish. Rows are in data set order:
under torchrun every rank writes the rows of its own shard (``dino_train.measure.features`` gives rank r
the images r, r + world, ...) into the same file, which rank 0 creates first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from dino_train.measure.features import extract_features
from dino_train.runtime import distributed as D
from dino_train.runtime.files import CheckpointError, atomic_write_text, write_json

STORE_FILE = "store.json"
TOKENS_FILE = "patch_tokens.npy"
FORMAT = "dino-feature-store"
_OURS = (STORE_FILE, TOKENS_FILE, "features.npy", "labels.npy", "paths.txt")


def cls_and_patch_tokens(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """(B, 3, H, W) -> ``model(images)`` (B, D) and the final-norm patch tokens (B, h*w, D) of a timm ViT."""
    tokens = model.forward_features(images)  # (B, prefix + h*w, D), after the final norm
    # forward_head on these tokens is exactly model(images): the CLS token (or the pool a model uses).
    return model.forward_head(tokens), tokens[:, model.num_prefix_tokens :]


def _rank_world() -> tuple[int, int]:
    return (
        (torch.distributed.get_rank(), torch.distributed.get_world_size()) if D.is_distributed() else (0, 1)
    )


def _prepare(folder: Path) -> None:
    """An empty or new folder, or an earlier store (overwritten); anything else is refused."""
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"feature store {folder} is a file; give a folder")
    others = sorted(p.name for p in folder.iterdir() if p.name not in _OURS) if folder.is_dir() else []
    if others:
        raise CheckpointError(
            f"feature store {folder} holds other files ({', '.join(others[:3])}); give a new or empty folder"
        )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STORE_FILE).unlink(missing_ok=True)  # the store is incomplete until finish() writes it


class PatchWriter:
    """A ``FeatureFn`` for :func:`dino_train.measure.features.extract_features` that writes each batch's
    patch tokens into ``folder/patch_tokens.npy`` (float16) as it comes, and hands back ``model(images)``
    (B, D)."""

    def __init__(self, folder: str | Path, model: nn.Module, dataset: Dataset):
        if not (hasattr(model, "forward_features") and hasattr(model, "num_prefix_tokens")):
            raise ValueError(f"patch tokens need a timm ViT; {type(model).__name__} has no patch tokens")
        if len(dataset) == 0:
            raise ValueError("no images to embed")
        self.folder, self.n = Path(folder), len(dataset)
        patch = int(model.patch_embed.patch_size[0])
        height, width = dataset[0][0].shape[-2:]  # every image of the data set has this size
        self.grid, self.patch_size, self.dim = (
            (height // patch, width // patch),
            patch,
            int(model.num_features),
        )
        self.rank, self.world = _rank_world()
        self.done = 0  # rows of this rank's shard written so far
        shape = (self.n, self.grid[0] * self.grid[1], self.dim)
        if self.rank == 0:
            _prepare(self.folder)
            np.lib.format.open_memmap(self.folder / TOKENS_FILE, "w+", np.float16, shape).flush()
        D.barrier()
        self.tokens = np.lib.format.open_memmap(self.folder / TOKENS_FILE, "r+")

    def __call__(self, model: nn.Module, images: Tensor) -> Tensor:
        cls, patches = cls_and_patch_tokens(model, images)
        if patches.shape[1:] != self.tokens.shape[1:]:
            raise ValueError(
                f"a batch gives patch tokens {tuple(patches.shape[1:])}, the store holds "
                f"{self.tokens.shape[1:]}: every image must have the first image's size"
            )
        # This rank's k-th image is the data set's image rank + k * world.
        start = self.rank + self.done * self.world
        self.tokens[start : start + len(images) * self.world : self.world] = patches.half().cpu().numpy()
        self.done += len(images)
        return cls

    def finish(self, feats: Tensor, labels: Tensor, classes: list[str], paths: list[Path] | None) -> Path:
        """Flush this rank's rows, then (rank 0) write the features (N, D), labels (N,), paths and
        ``store.json``, which marks the store complete. Returns the folder."""
        expected = len(range(self.rank, self.n, self.world))
        if self.done != expected:
            raise RuntimeError(f"rank {self.rank} wrote {self.done} of its {expected} rows of {self.folder}")
        self.tokens.flush()
        del self.tokens  # closes the map: the file is complete on disk
        D.barrier()
        if self.rank == 0:
            np.save(self.folder / "features.npy", feats.float().numpy())
            np.save(self.folder / "labels.npy", labels.long().numpy())
            if paths is not None:
                atomic_write_text(self.folder / "paths.txt", "".join(f"{p}\n" for p in paths))
            meta = {"format": FORMAT, "version": 1, "num_images": self.n, "dim": self.dim,
                    "grid": list(self.grid), "patch_size": self.patch_size, "patch_tokens_dtype": "float16",
                    "classes": list(classes), "has_paths": paths is not None}  # fmt: skip
            write_json(self.folder / STORE_FILE, meta, indent=1)
        D.barrier()
        return self.folder


def stream_features(
    model: nn.Module,
    dataset: Dataset,
    folder: str | Path,
    batch_size: int,
    num_workers: int,
    device: torch.device | str,
    progress: bool = True,
    paths: list[Path] | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`dino_train.measure.features.extract_features` with the patch tokens streamed to the store
    ``folder`` (never all in memory). Returns what it returns: features (N, D) float32 and labels (N,)
    int64."""
    writer = PatchWriter(folder, model, dataset)
    feats, labels = extract_features(model, dataset, batch_size, num_workers, device, progress, writer)
    writer.finish(feats, labels, list(getattr(dataset, "classes", [])), paths)
    return feats, labels


@dataclass
class FeatureStore:
    """A store opened by :func:`open_store`; the tensors are memory-mapped, read from disk when used."""

    folder: Path
    features: Tensor  # (N, D) float32
    patch_tokens: Tensor  # (N, h*w, D) float16, row-major over the grid
    labels: Tensor  # (N,) int64 indexing `classes`; -1: unlabelled
    grid: tuple[int, int]  # (h, w) patches
    patch_size: int  # pixels per patch side
    classes: list[str]
    paths: list[Path] | None

    def __len__(self) -> int:
        return len(self.features)

    def patch_grid(self, i: int) -> Tensor:
        """Image ``i``'s patch tokens as a (h, w, D) float32 grid."""
        return self.patch_tokens[i].float().reshape(*self.grid, -1)


def _array(folder: Path, name: str) -> Tensor:
    # Copy-on-write: pages are read on use, and a write to the tensor never reaches the file.
    try:
        return torch.from_numpy(np.load(folder / name, mmap_mode="c", allow_pickle=False))
    except (OSError, ValueError) as err:  # missing, cut short (numpy checks the size), not .npy
        raise CheckpointError(
            f"{folder / name} cannot be read as the store's array: {err}; re-extract"
        ) from err


def open_store(folder: str | Path) -> FeatureStore:
    """Open a store written by :class:`PatchWriter` (``eval_knn --dump-features DIR --patch-tokens`` or
    ``dino.extract_features(..., patch_tokens=True, out=DIR)``); a CheckpointError names what is wrong."""
    folder = Path(folder)
    try:
        meta: dict[str, Any] = json.loads((folder / STORE_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{folder} has no {STORE_FILE}: not a feature store, or its extraction did not finish"
        ) from None
    except ValueError as err:
        raise CheckpointError(f"{folder / STORE_FILE} is not readable JSON: {err}") from err
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder / STORE_FILE} is not a {FORMAT} description")
    missing = [k for k in ("num_images", "grid", "dim", "patch_size", "classes") if k not in meta]
    if missing:
        raise CheckpointError(f"{folder / STORE_FILE} lacks {', '.join(missing)}; re-extract")
    tokens, feats, labels = (_array(folder, n) for n in (TOKENS_FILE, "features.npy", "labels.npy"))
    n, grid = meta["num_images"], tuple(meta["grid"])
    if tokens.shape != (n, grid[0] * grid[1], meta["dim"]) or len(feats) != n or len(labels) != n:
        raise CheckpointError(f"{folder}: the arrays' shapes do not match {STORE_FILE}; re-extract")
    paths = None
    if meta.get("has_paths"):
        paths = [Path(line) for line in (folder / "paths.txt").read_text().splitlines()]
    return FeatureStore(folder, feats, tokens, labels, grid, meta["patch_size"], meta["classes"], paths)
