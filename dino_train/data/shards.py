"""Streaming pretraining data from webdataset tar shards (``data.format=shards``): read sequentially,
shuffled in a buffer, split by rank and loader worker, resumable to the same position.

Streams. With R ranks and W loader workers (W = max(num_workers, 1)) there are R * W streams; stream
q = rank * W + s. Each stream is endless, made of passes: pass p takes every (R * W)-th shard of the
shards permuted by ``seed + p`` (the same permutation on every rank), reads its tar files in order
(webdataset's tar readers) through a shuffle buffer seeded by (seed, q, p) (webdataset's shuffle), and
decodes and augments each sample with a seed drawn from (seed, q, position in the stream).

Batches. Batch g of a rank (counted over the whole run) is made of B consecutive samples of stream
g % W; the DataLoader's workers take batches in turn, so worker w of an epoch starting at batch g0 reads
stream (g0 + w) % W. An epoch is ``samples // (R * B)`` batches, as on the folder path.

Resume. The position in every stream follows from the run's batch count (the checkpoint's epoch and
batch), so a resumed run skips exactly the samples each (rank, worker) stream had consumed: whole passes
by the shard index's counts, the rest of the pass by replaying its raw bytes through the shuffle buffer
without decoding them. Its next batch is the batch an uninterrupted run would have drawn, as long as
the world size, ``data.num_workers`` and the batch size are unchanged; with others the streams are cut
differently and the run continues from the same number of samples per stream, not the same samples.
"""

from __future__ import annotations

import io
import random
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import shuffle
from webdataset.tariterators import group_by_keys, tar_file_expander

from dino_train.data.datasets import IMAGE_EXTENSIONS, UNREADABLE, DataError, load_rgb
from dino_train.data.loader import (
    collate_augmented_crops,
    collate_crops,
    collate_raw_crops,
    ignore_stop_signals,
)
from dino_train.data.sampler import MAX_REPLACEMENTS, EpochPosition, mix_seed, seeded_call
from dino_train.data.shard_index import ShardIndex, load_shard_index, pass_shards
from dino_train.data.tensor_augment import TensorMultiCrop, load_rgb_draft
from dino_train.data.transforms import MultiCropAugmentation

IMAGE_KEYS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
_SHUFFLE_INITIAL = 100  # samples in the buffer before the first is handed out (webdataset's default)


def raw_samples(paths: list[Path]) -> Iterator[dict[str, Any]]:
    """webdataset's sample dicts ({"__key__", "jpg": bytes, "cls": bytes, ...}) of ``paths`` in order;
    a damaged shard is reported and the rest of it skipped."""

    def opened() -> Iterator[dict[str, Any]]:
        for p in paths:
            try:
                fh = open(p, "rb")  # noqa: SIM115 (closed below, after webdataset has read it)
            except OSError as err:  # removed or unmounted since the index was read
                raise DataError(f"shard {p} cannot be opened in the middle of the run: {err}") from err
            with fh:
                yield {"url": str(p), "stream": fh}

    def warn(err: Exception) -> bool:
        warnings.warn(f"skipping the rest of a damaged shard: {err}", stacklevel=2)
        return True

    return group_by_keys(tar_file_expander(opened(), handler=warn), handler=warn)


class ShardStream(EpochPosition, IterableDataset):
    """Batches of this rank from the shards of ``index`` (see the module's docstring). It also plays
    the sampler's part for the training loop: ``set_epoch``, ``set_start_batch``, ``batches_per_epoch``.

    ``transform`` maps a PIL image to one sample's crops; ``collate_fn`` maps B ``(crops, label,
    skipped)`` items to a batch; ``decode`` maps an image file object to a PIL RGB image.
    """

    def __init__(
        self,
        index: ShardIndex,
        transform: Callable[[Any], Any],
        batch_size: int,
        n_streams: int,
        seed: int,
        rank: int,
        world_size: int,
        *,
        collate_fn: Callable = collate_crops,
        decode: Callable[[Any], Any] = load_rgb,
        shuffle_buffer: int = 1000,
    ):
        self.index, self.transform, self.collate_fn, self.decode = index, transform, collate_fn, decode
        self.batch_size, self.n_streams, self.seed = batch_size, n_streams, seed
        self.rank, self.world_size, self.shuffle_buffer = rank, world_size, shuffle_buffer
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.index.samples // (self.world_size * self.batch_size)

    def consumed(self, batches_done: int) -> list[int]:
        """Samples each of this rank's W streams has handed out after ``batches_done`` batches."""
        w = self.n_streams
        return [max(0, -(-(batches_done - s) // w)) * self.batch_size for s in range(w)]

    def _locate(self, q: int, consumed: int) -> tuple[int, int]:
        """(pass, samples into it) of stream ``q`` after ``consumed`` samples: whole passes skipped by
        the index's counts."""
        n_q, p = self.world_size * self.n_streams, 0
        while True:
            shards = pass_shards(len(self.index.paths), self.seed, p, q, n_q)
            length = sum(self.index.counts[i] for i in shards)
            if consumed < length:
                return p, consumed
            consumed, p = consumed - length, p + 1

    def _raw_from(self, q: int, consumed: int) -> Iterator[dict[str, Any]]:
        """Stream ``q``'s shuffled raw samples from position ``consumed`` on, endlessly."""
        p, offset = self._locate(q, consumed)
        n_q = self.world_size * self.n_streams
        while True:
            shards = pass_shards(len(self.index.paths), self.seed, p, q, n_q)
            rng = random.Random(mix_seed(self.seed, q, p))
            raw = raw_samples([self.index.paths[i] for i in shards])
            shuffled = shuffle(self.shuffle_buffer, min(_SHUFFLE_INITIAL, self.shuffle_buffer), rng=rng)(raw)
            yield from islice(shuffled, offset, None)  # a resume replays the pass's start undecoded
            p, offset = p + 1, 0

    def _decode(self, sample: dict[str, Any]) -> tuple[Any, int]:
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if key is None:
            raise ValueError(f"sample {sample['__key__']} in {sample.get('__url__')} holds no image")
        label = int(sample["cls"]) if "cls" in sample else -1
        return self.decode(io.BytesIO(sample[key])), label

    def _images(self, raw: Iterator[dict[str, Any]]) -> Iterator[tuple[Any, int, int]]:
        """(image, label, skipped) per raw sample, one for one (so positions stay countable): a sample
        that does not decode is replaced by the stream's last good image (or the next, at its start)."""
        last, pending, bad_run = None, 0, 0
        for sample in raw:
            try:
                img, label = self._decode(sample)
            except UNREADABLE as err:
                where = f"{sample.get('__url__')}:{sample.get('__key__')}"
                warnings.warn(f"skipping unreadable image {where}: {type(err).__name__}: {err}", stacklevel=2)
                bad_run += 1
                if bad_run >= MAX_REPLACEMENTS:
                    raise DataError(f"{bad_run} unreadable images in a row up to {where}") from err
                if last is None:
                    pending += 1
                else:
                    yield last[0], last[1], 1
                continue
            for _ in range(pending):
                yield img, label, 1
            pending, bad_run, last = 0, 0, (img, label)
            yield img, label, 0

    def _batches(self, q: int, consumed: int, n_batches: int) -> Iterator[Any]:
        images = self._images(self._raw_from(q, consumed))
        for b in range(n_batches):
            items = []
            for i, (img, label, skipped) in enumerate(islice(images, self.batch_size)):
                seed = mix_seed(self.seed, q, consumed + b * self.batch_size + i)  # its place in the stream
                items.append((seeded_call(self.transform, img, seed), label, skipped))
            yield self.collate_fn(items)

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        w, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if n_workers != self.n_streams:
            raise DataError(f"the shard stream was cut for {self.n_streams} workers but runs in {n_workers}")
        spe = self.batches_per_epoch
        g0 = self.epoch * spe + self.start_batch
        s = (g0 + w) % n_workers
        n_batches = len(range(self.start_batch + w, spe, n_workers))
        return self._batches(self.rank * n_workers + s, self.consumed(g0)[s], n_batches)


def _augmentation(augment: str, crops: tuple) -> tuple[Callable, Callable, Callable]:
    """(per-sample transform, collate, decode) of ``data.augment_device``'s resolved mode: "pil" (the
    release's PIL pipeline) or the tensor path with its photometric ops in the workers ("cpu") or left
    for the GPU ("cuda"), JPEGs decoded at reduced size as on the folder path."""
    if augment == "pil":
        return MultiCropAugmentation(*crops), collate_crops, load_rgb
    tensor = TensorMultiCrop(*crops)
    collate = collate_raw_crops if augment == "cuda" else collate_augmented_crops
    return tensor, collate, _DraftDecoder(tensor.min_short_side)


def build_shard_loader(
    path: str,
    augment: str,
    crops: tuple,
    batch_size: int,
    num_workers: int,
    seed: int,
    rank: int,
    world_size: int,
    pin_memory: bool,
    shuffle_buffer: int = 1000,
) -> tuple[DataLoader, ShardStream]:
    """The multi-crop loader over the shards at ``path`` and its stream (which is also its sampler);
    ``crops`` are MultiCropAugmentation's arguments, ``augment`` the resolved data.augment_device."""
    index = load_shard_index(path)
    n_streams = max(num_workers, 1)
    if len(index.paths) < world_size * n_streams:
        raise DataError(
            f"data path {path} has {len(index.paths)} shard(s), fewer than {world_size} process(es) x "
            f"{n_streams} loader worker(s); write smaller shards (dino-make-shards --shard-size) or lower "
            "data.num_workers"
        )
    if index.samples < batch_size * world_size:
        raise DataError(
            f"data path {path} has {index.samples} images, fewer than one global batch of "
            f"{batch_size} x {world_size} processes; lower data.batch_size_per_gpu"
        )
    transform, collate, decode = _augmentation(augment, crops)
    stream = ShardStream(
        index, transform, batch_size, n_streams, seed, rank, world_size,
        collate_fn=collate, decode=decode, shuffle_buffer=shuffle_buffer,
    )  # fmt: skip
    # Not persistent: the workers must see each epoch's set_epoch / set_start_batch (the dataset is
    # pickled to them when an epoch's iterator starts).
    loader = DataLoader(
        stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
        prefetch_factor=2 if num_workers > 0 else None, worker_init_fn=ignore_stop_signals,
    )  # fmt: skip
    return loader, stream


@dataclass(frozen=True)
class _DraftDecoder:
    """Picklable ``load_rgb_draft`` with its short side bound (for the loader's workers)."""

    min_short_side: int

    def __call__(self, fh: Any) -> Any:
        return load_rgb_draft(fh, self.min_short_side)
