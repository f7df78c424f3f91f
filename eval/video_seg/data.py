"""Videos and masks on disk for video object segmentation, in the DAVIS 2017 layout.

    root/JPEGImages/480p/<video>/00000.jpg ...      frames (the resolution folder is optional)
    root/Annotations/480p/<video>/00000.png ...     palette PNGs: 0 background, k object k, 255 void
    root/ImageSets/2017/val.txt                     optional: the videos to evaluate, one a line

Only the first frame's mask is needed to segment a video; the others, where present, are the truth it is
scored against. Frames are resized as the release does: the short side to 480 px, the long side in
proportion and floored to a multiple of 64 px.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from dino_train.data.datasets import UNREADABLE, DataError, load_rgb
from dino_train.data.embedded_video import davis_palette
from dino_train.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from eval.video_seg.metrics import VOID_LABEL

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")
SHORT_SIDE = 480  # the release's frame size
SIZE_MULTIPLE = 64  # the release floors the long side to a multiple of this


@dataclass(frozen=True)
class Video:
    """One video: its frames in order and, per frame, its annotation file (None where there is none)."""

    name: str
    frames: list[Path]
    masks: list[Path | None]

    @property
    def fully_annotated(self) -> bool:
        return all(m is not None for m in self.masks)


def _layout_folder(root: Path, kind: str, resolution: str) -> Path:
    with_res = root / kind / resolution
    return with_res if with_res.is_dir() else root / kind


def _video_names(root: Path, frames_root: Path, names: list[str] | None, split: str | None) -> list[str]:
    if names:
        return names
    split_file = root / split if split else root / "ImageSets" / "2017" / "val.txt"
    if split_file.is_file():
        return [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
    if split:
        raise DataError(f"split file {split_file} does not exist")
    return sorted(p.name for p in frames_root.iterdir() if p.is_dir() and not p.name.startswith("."))


def find_videos(
    root: str | Path, resolution: str = "480p", names: list[str] | None = None, split: str | None = None
) -> list[Video]:
    """The videos under a DAVIS-layout ``root``: ``names``, else those of the split file (``split``
    relative to root; default ImageSets/2017/val.txt when present), else every frame folder."""
    root = Path(root)
    frames_root = _layout_folder(root, "JPEGImages", resolution)
    masks_root = _layout_folder(root, "Annotations", resolution)
    if not frames_root.is_dir():
        raise DataError(
            f"--videos {root} has no JPEGImages/{resolution}/ (the DAVIS layout: frames per video)"
        )
    videos = []
    for name in _video_names(root, frames_root, names, split):
        folder = frames_root / name
        frames = (
            sorted(p for p in folder.glob("*") if p.suffix.lower() in FRAME_EXTENSIONS)
            if folder.is_dir()
            else []
        )
        if not frames:
            raise DataError(f"video {name}: no frames in {folder}")
        masks = [(masks_root / name / f"{f.stem}.png") for f in frames]
        if not masks[0].is_file():
            raise DataError(f"video {name}: the first frame's mask {masks[0]} does not exist")
        videos.append(Video(name, frames, [m if m.is_file() else None for m in masks]))
    return videos


def target_size(height: int, width: int, short_side: int, multiple: int, patch: int) -> tuple[int, int]:
    """(H, W) the network sees: the short side ``short_side`` (floored to a multiple of ``patch``), the
    long side in proportion floored to a multiple of ``multiple``."""
    short = short_side // patch * patch
    long_side = int(short * max(height, width) / min(height, width)) // multiple * multiple
    if short == 0 or long_side == 0:
        raise DataError(
            f"a {width}x{height} frame resized to short side {short_side} leaves no {patch} px patch"
        )
    return (long_side, short) if height > width else (short, long_side)


def read_frame(path: Path, size: tuple[int, int]) -> tuple[torch.Tensor, np.ndarray]:
    """The frame as a (1, 3, H, W) normalised tensor at ``size`` (H, W), and as (h, w, 3) uint8 RGB at
    its own size (for the overlay)."""
    try:
        img = load_rgb(path)
    except UNREADABLE as err:
        raise DataError(f"{path} cannot be read as an image ({err})") from err
    x = TF.to_tensor(img.resize((size[1], size[0]), Image.BILINEAR))
    return TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)[None], np.asarray(img)


def read_labels(path: Path) -> tuple[np.ndarray, list[int] | None]:
    """(H, W) uint8 labels of a mask PNG (palette indices; a grayscale mask's values) and its palette."""
    try:
        with Image.open(path) as img:
            palette = img.getpalette() if img.mode == "P" else None
            if img.mode not in ("P", "L"):
                raise DataError(
                    f"mask {path} is a {img.mode} image; DAVIS masks are palette (P) or gray PNGs"
                )
            return np.asarray(img), palette
    except UNREADABLE as err:
        raise DataError(f"{path} cannot be read as a mask ({err})") from err


def object_ids(labels: np.ndarray) -> list[int]:
    """The object ids of a label map: every value but background (0) and void (255)."""
    return sorted(int(v) for v in np.unique(labels) if v not in (0, VOID_LABEL))


def labels_on_grid(labels: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(H, W) labels -> (h, w) by nearest resizing (the release's rule); void becomes background."""
    small = np.array(Image.fromarray(labels).resize((grid[1], grid[0]), Image.NEAREST))
    small[small == VOID_LABEL] = 0
    return small


def overlay(
    frame: np.ndarray, labels: np.ndarray, palette: list[int] | None, alpha: float = 0.5
) -> np.ndarray:
    """(H, W, 3) uint8 frame with each object's pixels blended with its palette colour."""
    full = list(palette or [])[:768]
    full += davis_palette()[len(full) :]  # PIL may return a short palette
    colours = np.asarray(full, dtype=np.float32).reshape(256, 3)
    out = frame.astype(np.float32)
    fg = labels > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * colours[labels[fg]]
    return np.clip(out, 0, 255).astype(np.uint8)
