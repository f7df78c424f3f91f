"""Images on disk: class-folder data sets (ImageFolder layout) and flat folders of unlabelled images."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")


class DataError(ValueError):
    """A data set that cannot be used; the message names the path."""


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if _is_image(p))


class ImageDataset(Dataset):
    """Labelled when ``root`` holds class sub-folders of images (classes sorted by name), unlabelled
    (label -1, ``classes == []``) when it holds image files directly. Items are ``(transform(img), label)``
    with the image converted to RGB."""

    def __init__(self, root: str | Path, transform: Callable[[Image.Image], Any] | None = None):
        self.root = Path(root)
        self.transform = transform
        if not self.root.exists():
            raise DataError(f"data path {self.root} does not exist")
        if not self.root.is_dir():
            raise DataError(f"data path {self.root} is a file, not a folder of images")
        flat = sorted(p for p in self.root.iterdir() if _is_image(p))
        subdirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.classes: list[str] = []
        self.samples: list[tuple[Path, int]] = []
        if flat:
            self.samples = [(p, -1) for p in flat]
        else:
            for d in subdirs:
                files = _images_under(d)
                if not files:
                    warnings.warn(f"class folder {d} has no images; skipped", stacklevel=2)
                    continue
                label = len(self.classes)
                self.classes.append(d.name)
                self.samples.extend((p, label) for p in files)
        if not self.samples:
            raise DataError(
                f"no images found in {self.root} (looked for {', '.join(IMAGE_EXTENSIONS)} directly inside "
                "it or in class sub-folders)"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        with Image.open(path) as img:
            img = img.convert("RGB")
        return (self.transform(img) if self.transform is not None else img), label
