"""Object masks for the attention Jaccard: reading mask files as label maps (one id per object), pairing
them with their images, and the per-object views the paper's rule scores.

A mask file is read as a label map: 0 is background and every other value one object. In the VOC
convention (objects 1..N, their borders 255), 255 is void when the mask also holds other ids: not an
object, and, as in the paper's code, not taken out of the union either. A plain binary mask (0 / 255, or
0 / 1) is one object. Palette PNGs (VOC, DAVIS) are read by index, greyscale by value and RGB by colour
(black is background); a greyscale mask with more than ``_MAX_IDS`` grey levels is a soft mask (an
anti-aliased or resized silhouette) and is thresholded at half."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import functional as TF

from dino_train.data import IMAGE_EXTENSIONS
from dino_train.data.datasets import load_rgb
from dino_train.data.transforms import BICUBIC
from dino_train.measure.attention import prepare_image

VOID = 255  # VOC's border label: void where the mask holds other objects
_MAX_IDS = 64  # more distinct grey levels than this: a soft mask, not a label map


def object_ids(labels: Tensor) -> list[int]:
    """The objects of an (H, W) label map, in increasing id: every nonzero value, 255 left out when the
    map holds other ids (VOC's void border). A bool mask is one object (id 1) when it holds any pixel."""
    ids = [int(v) for v in torch.unique(labels.long()) if int(v) != 0]
    return [i for i in ids if i != VOID] if len(ids) > 1 and VOID in ids else ids


def foreground(labels: Tensor) -> Tensor:
    """(H, W) bool: the pixels of any object (see :func:`object_ids`)."""
    ids = object_ids(labels)
    if not ids:
        return torch.zeros(labels.shape, dtype=torch.bool)
    return torch.isin(labels.long(), torch.tensor(ids, dtype=torch.long))


def object_masks(labels: Tensor) -> Tensor:
    """(O, H, W) bool: one mask per object of ``labels``, in :func:`object_ids` order (O may be 0)."""
    ids = object_ids(labels)
    if not ids:
        return torch.zeros(0, *labels.shape, dtype=torch.bool)
    return labels.long()[None] == torch.tensor(ids, dtype=torch.long)[:, None, None]


def _label_array(img: Image.Image) -> np.ndarray:
    """A mask image as an (H, W) int64 label map (see the module's rules)."""
    if img.mode == "P":
        return np.asarray(img, dtype=np.int64)
    if img.mode in ("RGB", "RGBA"):
        rgb = np.asarray(img.convert("RGB"), dtype=np.int64)
        packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        colours, labels = np.unique(packed, return_inverse=True)
        labels = labels.reshape(packed.shape)
        return labels if colours[0] == 0 else labels + 1  # black, when present, stays 0
    grey = np.asarray(img.convert("L"), dtype=np.int64)
    if len(np.unique(grey[grey > 0])) > _MAX_IDS:
        return (grey > 127).astype(np.int64) * VOID
    return grey


def _read_labels(path: Path) -> np.ndarray:
    """A mask file's (H, W) label map, as stored."""
    try:
        with Image.open(path) as m:
            return _label_array(m)
    except OSError as err:
        raise ValueError(f"{path} is not a readable mask image ({err})") from err


def _fit(labels: np.ndarray, size: tuple[int, int], patch: int) -> Tensor:
    """``labels`` resized like its image (nearest: ids stay ids) to ``size`` (W, H) and cropped to whole
    patches: (H, W) int64."""
    resized = Image.fromarray(labels.astype(np.int32), mode="I").resize(size, Image.NEAREST)
    arr = np.asarray(resized, dtype=np.int64)
    h, w = arr.shape[0] - arr.shape[0] % patch, arr.shape[1] - arr.shape[1] % patch
    return torch.from_numpy(arr[:h, :w].copy())


def load_mask(path: Path, size: tuple[int, int], patch: int) -> Tensor:
    """The label map of a mask file resized like its image (nearest: ids stay ids) to ``size`` (W, H) and
    cropped to whole patches: (H, W) int64."""
    return _fit(_read_labels(path), size, patch)


def paired_files(images_dir: Path, masks_dir: Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs: each mask under ``masks_dir`` at the same relative path as its image (any
    image extension); images without a mask are skipped, and no pair at all is an error."""
    masks = {
        p.relative_to(masks_dir).with_suffix(""): p
        for p in masks_dir.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
    }
    pairs = []
    for img in sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
        mask = masks.get(img.relative_to(images_dir).with_suffix(""))
        if mask is not None:
            pairs.append((img, mask))
    if not pairs:
        raise ValueError(f"no image in {images_dir} has a mask at the same relative path in {masks_dir}")
    return pairs


def load_pairs(
    pairs: Sequence[tuple[Path, Path]], patch: int, image_size: int | None = None
) -> tuple[list[Tensor], list[Tensor]]:
    """The (image, mask) files of :func:`paired_files`, in their order: normalised (1, 3, H, W) images
    cropped to whole patches and their (H, W) label maps at the same size; ``image_size`` resizes the
    short side (None: as stored), as ``visualize_attention`` does."""
    images, masks = [], []
    for img_path, mask_path in pairs:
        img, labels = load_rgb(img_path), _read_labels(mask_path)
        if labels.shape[::-1] != img.size:  # another image's mask, or at another scale: not stretched
            raise ValueError(
                f"{mask_path} is {labels.shape[1]}x{labels.shape[0]} but its image {img_path} is "
                f"{img.size[0]}x{img.size[1]}: a mask must have its image's size"
            )
        if image_size:
            img = TF.resize(img, image_size, interpolation=BICUBIC)
        images.append(prepare_image(img, None, patch))
        masks.append(_fit(labels, img.size, patch))
    return images, masks


def load_masked_images(
    images_dir: Path, masks_dir: Path, patch: int, image_size: int | None = None
) -> tuple[list[Tensor], list[Tensor]]:
    """:func:`load_pairs` of every image of a folder that has a mask in ``masks_dir``."""
    return load_pairs(paired_files(Path(images_dir), Path(masks_dir)), patch, image_size)
