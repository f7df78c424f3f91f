"""A labelled ``train/`` + ``val/`` pair of class folders with one class list for both: what every
measure that needs labels (k-NN, linear probe, fine-tuning, the training monitor) opens."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dino_train.data.datasets import DataError, ImageDataset


@dataclass
class ClassFolders:
    """A ``train/`` + ``val/`` class-folder pair with one class list for both (train's classes first)."""

    train: Any  # ImageDataset
    val: Any
    classes: list[str]
    missing_from_train: list[str]  # val classes with no training images: never predicted correctly

    def remap(self, dataset: Any, labels: torch.Tensor) -> torch.Tensor:
        """Labels indexing ``dataset.classes`` -> labels indexing ``self.classes``."""
        index = {c: i for i, c in enumerate(self.classes)}
        table = torch.tensor([index[c] for c in dataset.classes], dtype=torch.long)
        return table[labels.long()]


def class_folders(
    train_root: str | Path, val_root: str | Path, train_tf: Any, val_tf: Any, channels: int | None = None
) -> ClassFolders:
    """Open both splits, of RGB images or, with ``channels``, of N-band files (``bands.BandDataset``).
    Classes present in val but not in train are warned about, not fatal."""
    if channels is None:
        train, val = ImageDataset(train_root, train_tf), ImageDataset(val_root, val_tf)
    else:
        from dino_train.data.bands import BandDataset

        train, val = BandDataset(train_root, channels, train_tf), BandDataset(val_root, channels, val_tf)
    for split in (train, val):
        if not split.classes:
            raise DataError(f"{split.root} holds images but no class sub-folders; evaluation needs labels")
    classes = list(train.classes)
    missing = [c for c in val.classes if c not in set(train.classes)]
    if missing:
        warnings.warn(
            f"{len(missing)} val classes have no training images (never predicted): {', '.join(missing)}",
            stacklevel=2,
        )
    return ClassFolders(train, val, classes + missing, missing)
