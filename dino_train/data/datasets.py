"""Images on disk: class-folder data sets (ImageFolder layout) and flat folders of unlabelled images."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")


class DataError(ValueError):
    """A data set that cannot be used; the message names the path."""


# What a broken or hostile file raises while being opened or decoded: we skip such files, never crash.
UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16-bit and float images are rescaled (PIL would clip them), transparent
    pixels are put on white, palette, grayscale and CMYK are converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = (0.0, 65535.0) if img.mode.startswith("I;16") else (float(arr.min()), float(arr.max()))
        arr = (arr - lo) * (255.0 / max(hi - lo, 1e-12))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB")


def load_rgb(path: Path) -> Image.Image:
    """Open and fully decode ``path`` as RGB; raises one of ``UNREADABLE`` for a bad file."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def _is_image(p: Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> bool:
    return p.is_file() and p.suffix.lower() in extensions


def _images_under(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if _is_image(p, extensions))


class ImageDataset(Dataset):
    """Labelled when ``root`` holds class sub-folders of images (classes sorted by name), unlabelled
    (label -1, ``classes == []``) when it holds image files directly. Items are ``(transform(img), label)``
    with the image converted to RGB (``load``; ``bands.BandDataset`` reads N-band files instead)."""

    extensions: tuple[str, ...] = IMAGE_EXTENSIONS

    def __init__(self, root: str | Path, transform: Callable[[Image.Image], Any] | None = None):
        self.root = Path(root)
        self.transform = transform
        if not self.root.exists():
            raise DataError(f"data path {self.root} does not exist")
        if not self.root.is_dir():
            raise DataError(f"data path {self.root} is a file, not a folder of images")
        flat = sorted(p for p in self.root.iterdir() if _is_image(p, self.extensions))
        subdirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.classes: list[str] = []
        self.samples: list[tuple[Path, int]] = []
        if flat:
            self.samples = [(p, -1) for p in flat]
            if subdirs:
                warnings.warn(
                    f"{self.root} holds images directly, so it is read as one flat unlabelled folder; "
                    f"its {len(subdirs)} sub-folder(s) are ignored",
                    stacklevel=2,
                )
        else:
            for d in subdirs:
                files = _images_under(d, self.extensions)
                if not files:
                    warnings.warn(f"class folder {d} has no images; skipped", stacklevel=2)
                    continue
                label = len(self.classes)
                self.classes.append(d.name)
                self.samples.extend((p, label) for p in files)
        if not self.samples:
            raise DataError(
                f"no images found in {self.root} (looked for {', '.join(self.extensions)} directly inside "
                "it or in class sub-folders)"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, path: Path) -> Any:
        """One file as this data set's items hold it (RGB here); raises one of ``UNREADABLE``."""
        return load_rgb(path)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        img = self.load(path)
        return (self.transform(img) if self.transform is not None else img), label
