"""How well a ViT's CLS attention segments objects, as the DINO paper measures it: the Jaccard index
(intersection over union) between the mask of the fewest patches holding 60% of the attention mass and
the object's mask, per head and for the head mean, averaged over images."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import functional as TF

from dino_train.data import IMAGE_EXTENSIONS
from dino_train.data.datasets import load_rgb
from dino_train.data.transforms import BICUBIC
from eval.attention import prepare_image, summarize, upsample, vit_patch_size


def jaccard(a: Tensor, b: Tensor) -> Tensor:
    """Intersection over union of bool masks over the last two dims: (..., H, W) -> (...); 1 when both
    are empty."""
    inter = (a & b).flatten(-2).sum(-1).float()
    union = (a | b).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


@dataclass
class JaccardResult:
    mean: float  # Jaccard (%) of the head-mean attention's mask, averaged over images
    per_head: list[float]  # the same for each head's own mask
    best_head: float  # the best of per_head (the paper's ViT numbers use the best head)
    images: int

    def as_dict(self) -> dict:
        return {
            "mean": self.mean,
            "per_head": self.per_head,
            "best_head": self.best_head,
            "images": self.images,
        }


@torch.no_grad()
def attention_jaccard(
    model: nn.Module, images: Sequence[Tensor], masks: Sequence[Tensor], threshold: float = 0.6
) -> JaccardResult:
    """``images``: normalised (1, 3, H, W) tensors (H, W multiples of the patch size); ``masks``: bool
    (H, W) object masks at the same size. The attention masks are nearest-upsampled to pixels."""
    if len(images) != len(masks) or not images:
        raise ValueError(f"need as many masks as images (and at least one); got {len(images)}, {len(masks)}")
    p = vit_patch_size(model)
    device = next(model.parameters()).device
    heads, means = [], []
    for img, mask in zip(images, masks, strict=True):
        s = summarize(model, img.to(device), threshold)
        target = mask.to(device).bool()
        heads.append(jaccard(upsample(s.head_masks, p)[0], target))
        means.append(jaccard(upsample(s.mean_mask, p)[0, 0], target))
    per_head = (100 * torch.stack(heads).mean(0)).tolist()
    return JaccardResult(float(100 * torch.stack(means).mean()), per_head, max(per_head), len(images))


def _load_mask(path: Path, size: tuple[int, int], patch: int) -> Tensor:
    """A mask image (nonzero = object) resized like its image (nearest) and cropped to whole patches."""
    with Image.open(path) as m:
        arr = np.asarray(m.convert("L").resize(size, Image.NEAREST)) > 127
    h, w = arr.shape[0] - arr.shape[0] % patch, arr.shape[1] - arr.shape[1] % patch
    return torch.from_numpy(arr[:h, :w].copy())


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


def load_masked_images(
    images_dir: Path, masks_dir: Path, patch: int, image_size: int | None = None
) -> tuple[list[Tensor], list[Tensor]]:
    """The images of a folder that have a mask in ``masks_dir``, normalised (1, 3, H, W) and cropped to
    whole patches, and their bool masks at the same size; ``image_size`` resizes the short side (None: as
    stored), as ``visualize_attention`` does."""
    images, masks = [], []
    for img_path, mask_path in paired_files(Path(images_dir), Path(masks_dir)):
        img = load_rgb(img_path)
        if image_size:
            img = TF.resize(img, image_size, interpolation=BICUBIC)
        images.append(prepare_image(img, None, patch))
        masks.append(_load_mask(mask_path, img.size, patch))
    return images, masks


def folder_jaccard(
    model: nn.Module, images_dir: Path, masks_dir: Path, image_size: int | None = None, threshold: float = 0.6
) -> JaccardResult:
    """``attention_jaccard`` over the images of a folder that have a mask in ``masks_dir`` (see
    :func:`load_masked_images`)."""
    images, masks = load_masked_images(images_dir, masks_dir, vit_patch_size(model), image_size)
    return attention_jaccard(model, images, masks, threshold)
