"""Frozen-backbone features of a folder, a list of images or a tensor batch, for a notebook.

The loop is ``dino_train.measure.features.extract_features`` (the one ``eval_knn`` and training's k-NN monitor
use); this module only turns what a notebook holds into a data set, and splits off patch tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset

from dino_train.data import ImageDataset
from dino_train.data.band_augment import eval_preprocess
from dino_train.data.bands import BandDataset, BandStats, backbone_band_stats, read_bands
from dino_train.data.datasets import DataError, load_rgb, to_rgb
from dino_train.data.transforms import resize_for
from dino_train.measure.feature_store import cls_and_patch_tokens, open_store, stream_features
from dino_train.measure.features import extract_features as extract_dataset
from dino_train.models.loading import input_bands
from dino_train.runtime.device import model_device

ImagesInput = str | Path | Sequence[str | Path | Image.Image] | Tensor


@dataclass
class Features:
    """What :func:`extract_features` returns; every tensor is on the CPU, in input order."""

    features: Tensor  # (N, D) float32: the backbone's output, for our ViTs the final-norm CLS token
    labels: Tensor | None  # (N,) int64 indexing `classes`, for a class-folder input; else None
    classes: list[str] = field(default_factory=list)  # class names (sub-folder names), sorted
    # (N, h*w, D) final-norm patch tokens, row-major over the grid: float32, or float16 memory-mapped from
    # the folder given as `out` (or to load_features)
    patch_tokens: Tensor | None = None
    paths: list[Path] | None = None  # the image files, for a folder or a list of paths

    def __len__(self) -> int:
        return len(self.features)


class _ImageList(Dataset):
    """Paths and/or PIL images through one transform; label -1 (unlabelled), as a flat folder. Paths are
    read by ``reader`` (RGB, or a multi-band backbone's bands)."""

    def __init__(
        self,
        items: Sequence[str | Path | Image.Image],
        transform: Callable[[Any], Tensor],
        reader: Callable[[Path], Any] = load_rgb,
    ):
        self.items, self.transform, self.reader = list(items), transform, reader

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        item = self.items[i]
        img = to_rgb(item) if isinstance(item, Image.Image) else self.reader(Path(item))
        return self.transform(img), -1


class _Batch(Dataset):
    """A (N, 3, H, W) tensor of images that are already preprocessed; label -1."""

    def __init__(self, images: Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], -1


def _cls_and_patches(model: nn.Module, images: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, 1 + h*w, D): ``model(images)`` first, then the final-norm patch tokens."""
    cls, patches = cls_and_patch_tokens(model, images)
    return torch.cat([cls[:, None], patches], dim=1)


def _dataset(images: ImagesInput, image_size: int, resize: int | None, stats: BandStats | None) -> Dataset:
    # The rule of every evaluation door (eval_knn --crop/--resize, training's k-NN monitor).
    transform = eval_preprocess(stats, resize or resize_for(image_size), image_size)
    bands = 3 if stats is None else stats.channels
    if isinstance(images, Tensor):
        batch = images.unsqueeze(0) if images.ndim == 3 else images
        if batch.ndim != 4 or batch.shape[1] != bands:
            raise ValueError(
                f"an image tensor must be (N, {bands}, H, W) or ({bands}, H, W); got {tuple(images.shape)}"
            )
        return _Batch(batch.float())
    if not isinstance(images, str | Path | Image.Image):
        images = list(images)
    pil = isinstance(images, Image.Image) or (
        isinstance(images, list) and any(isinstance(i, Image.Image) for i in images)
    )
    if stats is not None and pil:
        raise ValueError(f"a {bands}-band backbone reads files (or a tensor), not PIL images")
    reader = load_rgb if stats is None else partial(read_bands, channels=bands)
    if isinstance(images, str | Path):
        path = Path(images)
        if path.is_file():
            return _ImageList([path], transform, reader)
        return ImageDataset(path, transform) if stats is None else BandDataset(path, bands, transform)
    if isinstance(images, Image.Image):
        return _ImageList([images], transform)
    if not images:
        raise ValueError("no images given")
    return _ImageList(images, transform, reader)


def _band_stats(model: nn.Module, band_stats: BandStats | str | Path | None) -> BandStats | None:
    """The statistics given, else those recorded in the file the model was loaded from (None: RGB)."""
    info = {"in_chans": input_bands(model), **(getattr(model, "load_info", None) or {})}
    try:
        return backbone_band_stats(info, band_stats, "pass band_stats=")
    except DataError as err:
        raise ValueError(str(err)) from err


def extract_features(
    model: nn.Module,
    images_or_folder: ImagesInput,
    batch_size: int = 64,
    patch_tokens: bool = False,
    image_size: int = 224,
    resize: int | None = None,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
    out: str | Path | None = None,
    band_stats: BandStats | str | Path | None = None,
) -> Features:
    """Features of every image, with a progress bar.

    ``images_or_folder``: a folder (class sub-folders give labels, as torchvision's ImageFolder; a flat
    folder of images gives none), an image file, a list of paths and/or PIL images, or a (N, 3, H, W)
    tensor of ImageNet-normalised images, used as given. Files and PIL images are preprocessed as
    ``eval_knn --crop image_size --resize resize`` does, so the same arguments give the same features:
    bicubic resize of the short side to ``resize`` pixels (default ``image_size * 256 / 224``, the
    release's Resize(256) + CenterCrop(224), keeping the central 87.5% of each side), centre crop to
    ``image_size`` pixels, normalisation. ``resize=image_size`` keeps the whole image (the demo's
    setting on its 64 px images).
    ``patch_tokens``: also return the final-norm patch tokens (N, (image_size / patch)^2, D); a ViT only.
    ``device``: default the model's own (the model is moved to another one given here).
    ``num_workers``: image-decoding processes (0: decode in this one).
    ``out``: with ``patch_tokens``, a folder the patch tokens are streamed to as they are computed (float16,
    never all in memory: for large folders); ``patch_tokens`` is then memory-mapped from it, and
    ``dino_train.measure.feature_store.open_store(out)`` reopens it later.
    ``band_stats``: a multi-band backbone's per-band statistics (a ``dino-data-stats`` file or
    ``BandStats``); default those its checkpoint records. Its images are N-band files read as training
    read them (docs/multiband.md), or a (N, C, H, W) tensor already normalised.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if patch_tokens and not (hasattr(model, "forward_features") and hasattr(model, "num_prefix_tokens")):
        raise ValueError(f"patch_tokens=True needs a timm ViT; {type(model).__name__} has no patch tokens")
    dataset = _dataset(images_or_folder, image_size, resize, _band_stats(model, band_stats))
    device = torch.device(device) if device is not None else model_device(model)
    model.to(device)
    if out is not None:
        if not patch_tokens:
            raise ValueError("out= streams the patch tokens to disk: pass patch_tokens=True")
        args = (batch_size, num_workers, device, progress, _paths(dataset))
        feats, labels = stream_features(model, dataset, out, *args)
        return _result(dataset, feats, labels, open_store(out).patch_tokens)
    fn = _cls_and_patches if patch_tokens else None
    feats, labels = extract_dataset(model, dataset, batch_size, num_workers, device, progress, fn)
    patches = None
    if patch_tokens:
        # extract_dataset flattened each (1 + h*w, D) stack; the CLS part fixes D.
        dim = model.num_features
        stacks = feats.view(len(feats), -1, dim)
        feats, patches = stacks[:, 0].contiguous(), stacks[:, 1:].contiguous()
    return _result(dataset, feats, labels, patches)


def load_features(folder: str | Path) -> Features:
    """What ``extract_features(..., patch_tokens=True, out=folder)`` wrote, memory-mapped (read on use)."""
    store = open_store(folder)
    labelled = bool(store.classes)
    return Features(
        store.features, store.labels if labelled else None, store.classes, store.patch_tokens, store.paths
    )


def _paths(dataset: Dataset) -> list[Path] | None:
    """The image files in data set order, when the images came from files."""
    if isinstance(dataset, ImageDataset):
        return [p for p, _ in dataset.samples]
    if isinstance(dataset, _ImageList) and not any(isinstance(i, Image.Image) for i in dataset.items):
        return [Path(i) for i in dataset.items]
    return None


def _result(dataset: Dataset, feats: Tensor, labels: Tensor, patches: Tensor | None) -> Features:
    classes = list(getattr(dataset, "classes", []))
    return Features(feats, labels if classes else None, classes, patches, _paths(dataset))
