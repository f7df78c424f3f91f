"""Frozen-backbone features of a folder, a list of images or a tensor batch, for a notebook.

The loop is ``eval.features.extract_features`` (the one ``eval_knn`` and training's k-NN monitor
use); this module only turns what a notebook holds into a data set, and splits off patch tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset

from dino.models import model_device
from dino_train.data import ImageDataset, eval_transform
from dino_train.data.datasets import load_rgb, to_rgb
from eval.features import extract_features as extract_dataset

ImagesInput = str | Path | Sequence[str | Path | Image.Image] | Tensor


@dataclass
class Features:
    """What :func:`extract_features` returns; every tensor is on the CPU, in input order."""

    features: Tensor  # (N, D) float32: the backbone's output, for our ViTs the final-norm CLS token
    labels: Tensor | None  # (N,) int64 indexing `classes`, for a class-folder input; else None
    classes: list[str] = field(default_factory=list)  # class names (sub-folder names), sorted
    patch_tokens: Tensor | None = None  # (N, h*w, D) final-norm patch tokens, row-major over the grid
    paths: list[Path] | None = None  # the image files, for a folder or a list of paths

    def __len__(self) -> int:
        return len(self.features)


class _ImageList(Dataset):
    """Paths and/or PIL images through one transform; label -1 (unlabelled), as a flat folder."""

    def __init__(self, items: Sequence[str | Path | Image.Image], transform: Callable[[Image.Image], Tensor]):
        self.items, self.transform = list(items), transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        item = self.items[i]
        img = to_rgb(item) if isinstance(item, Image.Image) else load_rgb(Path(item))
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
    tokens = model.forward_features(images)  # (B, prefix + h*w, D), after the final norm
    # forward_head on these tokens is exactly model(images): the CLS token (or the pool a model uses).
    return torch.cat([model.forward_head(tokens)[:, None], tokens[:, model.num_prefix_tokens :]], dim=1)


def _dataset(images: ImagesInput, image_size: int, resize: int | None) -> Dataset:
    transform = eval_transform(resize=resize or round(image_size * 256 / 224), crop=image_size)
    if isinstance(images, Tensor):
        batch = images.unsqueeze(0) if images.ndim == 3 else images
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"an image tensor must be (N, 3, H, W) or (3, H, W); got {tuple(images.shape)}")
        return _Batch(batch.float())
    if isinstance(images, str | Path):
        path = Path(images)
        return ImageDataset(path, transform) if not path.is_file() else _ImageList([path], transform)
    if isinstance(images, Image.Image):
        return _ImageList([images], transform)
    items = list(images)
    if not items:
        raise ValueError("no images given")
    return _ImageList(items, transform)


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
) -> Features:
    """Features of every image, with a progress bar.

    ``images_or_folder``: a folder (class sub-folders give labels, as torchvision's ImageFolder; a flat
    folder of images gives none), an image file, a list of paths and/or PIL images, or a (N, 3, H, W)
    tensor of ImageNet-normalised images, used as given. Files and PIL images are preprocessed as the
    release's evaluation: bicubic resize of the short side to ``resize`` pixels (default
    ``image_size * 256 / 224``), centre crop to ``image_size`` pixels, normalisation.
    ``patch_tokens``: also return the final-norm patch tokens (N, (image_size / patch)^2, D); a ViT only.
    ``device``: default the model's own (the model is moved to another one given here).
    ``num_workers``: image-decoding processes (0: decode in this one).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if patch_tokens and not (hasattr(model, "forward_features") and hasattr(model, "num_prefix_tokens")):
        raise ValueError(f"patch_tokens=True needs a timm ViT; {type(model).__name__} has no patch tokens")
    dataset = _dataset(images_or_folder, image_size, resize)
    device = torch.device(device) if device is not None else model_device(model)
    model.to(device)
    fn = _cls_and_patches if patch_tokens else None
    feats, labels = extract_dataset(model, dataset, batch_size, num_workers, device, progress, fn)
    patches = None
    if patch_tokens:
        # extract_dataset flattened each (1 + h*w, D) stack; the CLS part fixes D.
        dim = model.num_features
        stacks = feats.view(len(feats), -1, dim)
        feats, patches = stacks[:, 0].contiguous(), stacks[:, 1:].contiguous()
    classes = list(getattr(dataset, "classes", []))
    paths = None
    if isinstance(dataset, ImageDataset):
        paths = [p for p, _ in dataset.samples]
    elif isinstance(dataset, _ImageList) and not any(isinstance(i, Image.Image) for i in dataset.items):
        paths = [Path(i) for i in dataset.items]
    return Features(feats, labels if classes else None, classes, patches, paths)
