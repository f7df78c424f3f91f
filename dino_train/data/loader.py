"""The pretraining data loader: multi-crop batches in a deterministic, resumable order."""

from __future__ import annotations

import signal
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader

from dino_train.data.datasets import UNREADABLE, DataError, ImageDataset
from dino_train.data.photometric import RawCrops, finish_crops
from dino_train.data.sampler import MultiCropDataset, ResumableSampler
from dino_train.data.tensor_augment import DraftImageDataset, TensorMultiCrop

AUGMENT_DEVICES = ("auto", "cpu", "cuda", "pil")

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


TensorItems = list[tuple[tuple[list[torch.Tensor], torch.Tensor], int, int]]


def collate_raw_crops(items: TensorItems) -> tuple[list[RawCrops], torch.Tensor, int]:
    """[((uint8 crops, parameter rows), label, skipped)] (``TensorMultiCrop``'s items) -> ([RawCrops
    per crop position: pixels (B, 3, S, S), params (B, N_PARAMS)], labels (B,), skipped)."""
    n_crops = len(items[0][0][0])
    crops = [
        RawCrops(torch.stack([it[0][0][c] for it in items]), torch.stack([it[0][1][c] for it in items]))
        for c in range(n_crops)
    ]
    labels = torch.tensor([it[1] for it in items], dtype=torch.long)
    return crops, labels, sum(it[2] for it in items)


def collate_augmented_crops(items: TensorItems) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """``collate_raw_crops`` then the photometric ops in the worker: the same ([g1 (B,3,G,G), g2,
    l1..lN], labels, skipped) as the PIL path's ``collate_crops``."""
    crops, labels, skipped = collate_raw_crops(items)
    return finish_crops(crops), labels, skipped


def probe_readable(dataset: ImageDataset, n: int = 32) -> None:
    """Read up to ``n`` files spread over the data set; none readable is an error before training starts."""
    step = max(len(dataset.samples) // n, 1)
    tried = dataset.samples[::step][:n]
    errors = []
    for path, _ in tried:
        try:
            dataset.load(path)
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
    *,
    base: ImageDataset | None = None,
    collate_fn: Callable = collate_crops,
) -> tuple[DataLoader, ResumableSampler]:
    """The multi-crop loader over the images at ``path`` and its resumable sampler (this rank's share);
    workers ignore stop signals (see :func:`ignore_stop_signals`). ``base`` replaces the plain
    ``ImageDataset(path)`` and ``collate_fn`` :func:`collate_crops` (the tensor path's decoding and
    batching, see :func:`build_tensor_pretrain_loader`)."""
    base = ImageDataset(path) if base is None else base
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
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        drop_last=True,
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
        worker_init_fn=ignore_stop_signals,
    )
    return loader, sampler


def build_tensor_pretrain_loader(
    path: str,
    augment: TensorMultiCrop,
    batch_size: int,
    num_workers: int,
    seed: int,
    rank: int,
    world_size: int,
    pin_memory: bool,
    on_device: bool,
) -> tuple[DataLoader, ResumableSampler]:
    """The loader of :func:`build_pretrain_loader` on the tensor path: JPEGs decoded at reduced size
    where ``augment.min_short_side`` allows, crops and parameters drawn per sample by ``augment``.

    ``on_device=False`` (``data.augment_device=cpu``): the workers' collate runs the photometric ops
    and batches are ([g1 (B,3,G,G), g2, l1..lN], labels, skipped) as on the PIL path.
    ``on_device=True`` (``cuda``): the crops are ``RawCrops`` (uint8 pixels and parameter rows); the
    training loop finishes them with ``photometric.crops_to_device``.
    """
    return build_pretrain_loader(
        path,
        augment,
        batch_size,
        num_workers,
        seed,
        rank,
        world_size,
        pin_memory,
        base=DraftImageDataset(path, augment.min_short_side),
        collate_fn=collate_raw_crops if on_device else collate_augmented_crops,
    )


def resolve_augment_device(mode: str, device: torch.device) -> str:
    """``data.augment_device`` -> "pil", "cpu" or "cuda" for a run training on ``device``.

    ``auto`` is ``cuda`` on a CUDA device (uint8 crops cross the bus, the photometric ops run on the
    GPU: PIL at ~35-45 images/s per core cannot feed a GPU's step) and ``cpu`` elsewhere: the tensor
    path in the loader workers, measured faster per core than PIL at both shapes (bench.data_pipeline,
    decode + multi-crop in CPU time on one core, 2026-12-05: 2.4x at the paper's 2x224 + 10x96 from
    500x375 JPEGs, 2.2x at the demo's 2x64 + 4x32 from 64 px PNGs).
    """
    if mode not in AUGMENT_DEVICES:
        raise ValueError(f"data.augment_device={mode!r} is not one of {', '.join(AUGMENT_DEVICES)}")
    if mode == "auto":
        return "cuda" if device.type == "cuda" else "cpu"
    if mode == "cuda" and device.type != "cuda":
        raise ValueError(f"data.augment_device=cuda needs a CUDA training device, not {device.type}")
    return mode
