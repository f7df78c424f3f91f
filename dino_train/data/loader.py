"""The pretraining data loader: multi-crop batches in a deterministic, resumable order."""

from __future__ import annotations

import signal
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader

from dino_train.data.datasets import UNREADABLE, DataError, ImageDataset, load_rgb
from dino_train.data.sampler import MultiCropDataset, ResumableSampler

# Stop requests are for the training process alone: it checkpoints at the next step and exits 0. A loader
# worker that died of them instead (torch's default for SIGTERM) would fail the run with "DataLoader worker
# exited unexpectedly" first. torchrun and a terminal send them to the whole process group.
WORKER_IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the worker ignores the stop signals, so the main process decides
    when to stop; a worker still ends when the main process shuts the loader down or dies (torch's
    watchdog), and SIGKILL still works. Seeding is per sample (MultiCropDataset), not per worker."""
    for s in WORKER_IGNORED_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def collate_crops(
    items: list[tuple[list[torch.Tensor], int, int]],
) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """[(crops, label, skipped)] -> ([crop_0 batch (B,3,H,W), ..., crop_n batch], labels (B,), skipped)."""
    n_crops = len(items[0][0])
    crops = [torch.stack([it[0][c] for it in items]) for c in range(n_crops)]
    return crops, torch.tensor([it[1] for it in items], dtype=torch.long), sum(it[2] for it in items)


def probe_readable(dataset: ImageDataset, n: int = 32) -> None:
    """Read up to ``n`` files spread over the data set; none readable is an error before training starts."""
    step = max(len(dataset.samples) // n, 1)
    tried = dataset.samples[::step][:n]
    errors = []
    for path, _ in tried:
        try:
            load_rgb(path)
            return
        except UNREADABLE as err:
            errors.append(f"{path}: {type(err).__name__}: {err}")
    raise DataError(
        f"none of {len(tried)} images tried in {dataset.root} could be read:\n  " + "\n  ".join(errors[:5])
    )


def build_pretrain_loader(
    path: str,
    transform: Callable,
    batch_size: int,
    num_workers: int,
    seed: int,
    rank: int,
    world_size: int,
    pin_memory: bool,
) -> tuple[DataLoader, ResumableSampler]:
    """The multi-crop loader over the images at ``path`` and its resumable sampler (this rank's share);
    workers ignore stop signals (see :func:`ignore_stop_signals`)."""
    base = ImageDataset(path)
    probe_readable(base)
    if len(base) < batch_size * world_size:
        raise DataError(
            f"data path {path} has {len(base)} images, fewer than one global batch of "
            f"{batch_size} x {world_size} processes = {batch_size * world_size}; "
            "lower data.batch_size_per_gpu"
        )
    sampler = ResumableSampler(len(base), world_size, rank, shuffle=True, seed=seed, batch_size=batch_size)
    loader = DataLoader(
        MultiCropDataset(base, transform, seed),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_crops,
        pin_memory=pin_memory,
        drop_last=True,
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
        worker_init_fn=ignore_stop_signals,
    )
    return loader, sampler
