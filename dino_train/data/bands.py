"""Images that are not RGB: N-band files (``data.channels``) and the per-band statistics that normalise them.

A multi-band image is read as float32 (C, H, W) of the file's own values (16-bit satellite counts stay
counts); normalisation by per-band mean and std, computed from the training data by ``dino-data-stats``
(``dino_train.data.band_stats_cli``), comes after augmentation, as ImageNet's mean and std do for RGB.

Files read (each band a plane of one image):

- ``.npy``: a 2-D array (one band) or 3-D, (C, H, W) when its first axis has ``channels`` entries, else
  (H, W, C) when its last has; ``np.load(allow_pickle=False)``, so a file cannot run code;
- ``.npz``: the array named ``image``, or the archive's only array;
- ``.tif`` / ``.tiff``: every page of the file, in order, each adding its bands (a greyscale page one, an
  RGB page three): the layout of multi-page band stacks; PIL reads up to four samples per page, so an
  8-band interleaved GeoTIFF is best converted to ``.npy`` first;
- ``.png``, ``.jpg`` and the other formats PIL reads: greyscale (8- or 16-bit) is one band, RGB three.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageSequence

from dino_train.data.datasets import IMAGE_EXTENSIONS, UNREADABLE, DataError, ImageDataset

BAND_EXTENSIONS = (".npy", ".npz", *IMAGE_EXTENSIONS)
STATS_FORMAT = "dino-band-stats"
STATS_VERSION = 1


def _pil_planes(img: Image.Image) -> list[np.ndarray]:
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    arr = np.asarray(img)
    if arr.ndim == 2:
        return [arr.astype(np.float32)]
    return [arr[..., c].astype(np.float32) for c in range(arr.shape[-1])]


def _array_bands(arr: np.ndarray, channels: int, path: Path) -> np.ndarray:
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{path}: holds {arr.dtype} values, not numbers")
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 3:
        if arr.shape[0] == channels:
            return arr
        if arr.shape[-1] == channels:
            return np.moveaxis(arr, -1, 0)
    raise DataError(
        f"{path}: an array of shape {list(arr.shape)} has no axis of data.channels={channels} bands "
        "(expected (C, H, W), (H, W, C) or (H, W))"
    )


def read_bands(path: str | Path, channels: int) -> torch.Tensor:
    """The image at ``path`` as float32 (channels, H, W) of its own values; a DataError naming the file
    when it cannot be read, holds another number of bands, or holds NaN or infinite values."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                arr = _array_bands(np.asarray(_from_npz(archive, path)), channels, path)
        elif suffix == ".npy":
            arr = _array_bands(np.load(path, allow_pickle=False), channels, path)
        else:
            with Image.open(path) as img:
                frames = ImageSequence.Iterator(img) if suffix in (".tif", ".tiff") else [img]
                planes = [p for frame in frames for p in _pil_planes(frame)]
            if len({p.shape for p in planes}) > 1:
                raise DataError(f"{path}: its pages differ in size ({sorted({p.shape for p in planes})})")
            arr = np.stack(planes)
    except DataError:
        raise
    except UNREADABLE as err:  # includes numpy's ValueError for a pickled or truncated array
        raise DataError(f"{path}: cannot be read as an image of bands: {type(err).__name__}: {err}") from err
    if arr.shape[0] != channels:
        raise DataError(f"{path}: has {arr.shape[0]} band(s), data.channels is {channels}")
    out = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if not torch.isfinite(out).all():
        raise DataError(f"{path}: holds NaN or infinite values (fill no-data pixels before training)")
    return out


def _from_npz(archive: Any, path: Path) -> np.ndarray:
    names = list(archive.files)
    if "image" in names:
        return archive["image"]
    if len(names) == 1:
        return archive[names[0]]
    raise DataError(f"{path}: holds arrays {names}; name the image's array 'image'")


class BandDataset(ImageDataset):
    """``ImageDataset`` of N-band files: the same class-folder or flat layout, items (float32 (C, H, W),
    label) of the file's own values (normalisation comes after augmentation)."""

    extensions = BAND_EXTENSIONS

    def __init__(self, root: str | Path, channels: int, transform: Callable[[Any], Any] | None = None):
        self.channels = channels
        super().__init__(root, transform)

    def load(self, path: Path) -> torch.Tensor:
        return read_bands(path, self.channels)


@dataclass(frozen=True)
class BandStats:
    """Per-band mean and std of a data set's pixel values (the file's units)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def channels(self) -> int:
        return len(self.mean)

    def as_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C, H, W) -> (x - mean) / std per band, a new tensor: never in place, since a crop that
        is the whole image at its own size comes back from torchvision as a view of the source."""
        shape = (-1, 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return (x - mean) / std


def stats_from_record(record: Any, where: str) -> BandStats:
    """``{"mean": [...], "std": [...]}`` -> BandStats; an error naming ``where`` and the key at fault."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a mapping with mean and std, got {type(record).__name__}")
    values = {}
    for key in ("mean", "std"):
        v = record.get(key)
        ok = (
            isinstance(v, list)
            and v
            and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
        )
        if not ok:
            raise DataError(f"{where}: {key} must be a non-empty list of numbers, got {v!r}")
        if not all(math.isfinite(x) for x in v):
            raise DataError(f"{where}: {key} holds a value that is not finite: {v}")
        values[key] = tuple(float(x) for x in v)
    if len(values["mean"]) != len(values["std"]):
        raise DataError(f"{where}: {len(values['mean'])} means but {len(values['std'])} stds")
    if any(s <= 0 for s in values["std"]):
        raise DataError(f"{where}: every std must be > 0, got {list(values['std'])}")
    return BandStats(values["mean"], values["std"])


def load_band_stats(path: str | Path, channels: int | None = None) -> BandStats:
    """The statistics ``dino-data-stats`` wrote to ``path``; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"band statistics {path} do not exist (write them with dino-data-stats)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"band statistics {path}: not readable JSON ({err})") from err
    if not isinstance(data, dict) or data.get("format") != STATS_FORMAT:
        raise DataError(f"band statistics {path}: not a {STATS_FORMAT} file (write it with dino-data-stats)")
    stats = stats_from_record(data, f"band statistics {path}")
    if channels is not None and stats.channels != channels:
        raise DataError(f"band statistics {path} are for {stats.channels} bands, data.channels is {channels}")
    return stats


def backbone_band_stats(
    info: dict[str, Any], given: BandStats | str | Path | None, hint: str
) -> BandStats | None:
    """The statistics a loaded backbone's inputs are normalised by (``info``: ``load_backbone``'s): those
    ``given`` (a ``dino-data-stats`` file or BandStats), else those its file records, else None for an RGB
    backbone; an N-band backbone with neither is a DataError ending with ``hint`` (how to give them)."""
    bands = int(info.get("in_chans") or 3)
    if isinstance(given, BandStats):
        return given
    if given:
        return load_band_stats(given, bands)
    recorded = info.get("input_stats")
    if recorded is not None:
        stats = stats_from_record(recorded, f"{info.get('path')}: its recorded input_stats")
        if stats.channels != bands:
            raise DataError(f"{info.get('path')}: statistics for {stats.channels} bands, model takes {bands}")
        return stats
    if bands != 3:
        raise DataError(
            f"{info.get('path')} is a {bands}-band backbone without recorded band statistics: {hint}"
        )
    return None


def save_band_stats(stats: BandStats, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    from dino_train.runtime.files import atomic_write_text

    record = {"format": STATS_FORMAT, "version": STATS_VERSION, "channels": stats.channels,
              **stats.as_dict(), **(extra or {})}  # fmt: skip
    return atomic_write_text(Path(path), json.dumps(record, indent=2) + "\n")


def compute_band_stats(
    images: Iterable[torch.Tensor],
) -> tuple[BandStats, int, list[int]]:
    """Mean and (population) std per band over every pixel of every image (C, H, W), combined image by
    image in float64 (Chan et al.'s pairwise update, stable for 16-bit counts). Returns the statistics,
    the number of images and the indices of bands that are constant (their std is set to 1, so they
    normalise to 0 instead of dividing by 0)."""
    count = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None
    n_images = 0
    for img in images:
        x = img.double().flatten(1).numpy()
        n = x.shape[1]
        mu = x.mean(axis=1)
        sq = ((x - mu[:, None]) ** 2).sum(axis=1)
        if mean is None:
            mean, m2, count = mu, sq, n
        else:
            total = count + n
            delta = mu - mean
            mean = mean + delta * (n / total)
            m2 = m2 + sq + delta**2 * (count * n / total)
            count = total
        n_images += 1
    if mean is None or m2 is None:
        raise DataError("no image could be read to compute band statistics from")
    std = np.sqrt(m2 / count)
    constant = [int(i) for i in np.flatnonzero(std <= 1e-12 * np.maximum(np.abs(mean), 1.0))]
    std[constant] = 1.0
    return BandStats(tuple(map(float, mean)), tuple(map(float, std))), n_images, constant
