"""Deterministic, resumable sampling across processes, independent of the number of loader workers."""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from dino_train.data.datasets import UNREADABLE, DataError

# A sample that cannot be read is replaced by the next one; this many failures in a row is an error.
MAX_REPLACEMENTS = 64


class EpochPosition:
    """Where a loader stands in its epochs, as training's loop drives it: ``set_epoch`` starts an epoch at
    its first batch, ``set_start_batch(k)`` resumes it after k batches. The subclass says how many batches
    an epoch has (``batches_per_epoch``) and reads ``epoch`` and ``start_batch``."""

    epoch: int = 0
    start_batch: int = 0

    @property
    def batches_per_epoch(self) -> int:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start_batch = epoch, 0

    def set_start_batch(self, batch_index: int) -> None:
        if not 0 <= batch_index <= self.batches_per_epoch:
            raise ValueError(f"start batch {batch_index} is outside this epoch's 0..{self.batches_per_epoch}")
        self.start_batch = batch_index


class ResumableSampler(EpochPosition, Sampler):
    """Each epoch a permutation seeded by ``seed + epoch``; rank r takes every ``num_replicas``-th item.

    Yields ``(index, epoch)`` so the dataset can seed each sample's augmentation in whatever worker loads
    it. ``set_start_batch(k)`` skips the first k batches of the epoch, for a mid-epoch resume.
    """

    def __init__(
        self,
        dataset_len: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        batch_size: int = 1,
        drop_last: bool = True,
    ):
        self.n, self.replicas, self.rank = dataset_len, num_replicas, rank
        self.shuffle, self.seed, self.batch_size, self.drop_last = shuffle, seed, batch_size, drop_last
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        per_rank = self._per_rank_len()
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def _per_rank_len(self) -> int:
        chunk = self.replicas * self.batch_size
        if self.drop_last:
            return (self.n // chunk) * self.batch_size
        return -(-self.n // self.replicas)

    def _epoch_indices(self) -> list[int]:
        if self.shuffle:
            perm = torch.randperm(
                self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)
            ).tolist()
        else:
            perm = list(range(self.n))
        total = self._per_rank_len() * self.replicas
        if total > len(perm):  # pad by wrapping around, so every rank gets as many items
            perm = (perm * (total // len(perm) + 1))[:total]
        return perm[:total][self.rank :: self.replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = self._epoch_indices()[self.start_batch * self.batch_size :]
        return iter([(i, self.epoch) for i in indices])

    def __len__(self) -> int:
        return max(self._per_rank_len() - self.start_batch * self.batch_size, 0)


def mix_seed(seed: int, a: int, b: int) -> int:
    """A 63-bit seed from three integers: per sample (seed, epoch, index) and per step (seed, rank, step),
    so a resumed run draws the same numbers."""
    return ((seed * 1_000_003 + a) * 1_000_033 + b) % (2**63)


class MultiCropDataset(Dataset):
    """Wraps a dataset of ``(PIL image, label)``; items are keyed by ``(index, epoch)`` and augmented with
    the global RNGs seeded from (seed, epoch, index), restored afterwards. The same sample therefore gets
    the same crops whatever worker loads it, and again after a resume."""

    def __init__(self, base: Dataset, transform: Callable[[Any], list[torch.Tensor]], seed: int = 0):
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def _load(self, index: int) -> tuple[Any, int, int]:
        """``(image, label, files skipped)``: an unreadable file is reported and the next one taken."""
        n = len(self)
        for skipped in range(min(MAX_REPLACEMENTS, n)):
            i = (index + skipped) % n
            try:
                img, label = self.base[i]
                return img, label, skipped
            except UNREADABLE as err:
                name = getattr(self.base, "samples", None)
                where = name[i][0] if name is not None else f"item {i}"
                warnings.warn(f"skipping unreadable image {where}: {type(err).__name__}: {err}", stacklevel=2)
        raise DataError(
            f"{min(MAX_REPLACEMENTS, n)} unreadable images in a row from item {index}: is the data broken?"
        )

    def __getitem__(self, key: tuple[int, int]) -> tuple[list[torch.Tensor], int, int]:
        """``(crops, label, unreadable files skipped to get this sample)``."""
        index, epoch = key
        img, label, skipped = self._load(index)
        return seeded_call(self.transform, img, mix_seed(self.seed, epoch, index)), label, skipped


def seeded_call(transform: Callable[[Any], Any], img: Any, seed: int) -> Any:
    """``transform(img)`` with torch's CPU generator and Python's ``random`` seeded by ``seed``, both
    restored afterwards: a sample's crops depend on its seed alone, not on the worker or the history."""
    py_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed would also reseed CUDA in the main process
            # (num_workers=0), changing the model's own random draws with the worker count.
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            return transform(img)
    finally:
        random.setstate(py_state)
