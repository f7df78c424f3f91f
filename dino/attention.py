"""Self-attention of a ViT on one image as numpy arrays for a notebook, the figure ``visualize_attention``
draws, and the paper's attention-segmentation score of ``eval_attention``. The maths is
``dino_train.measure.attention``'s: the exact softmax of a block, recomputed from its weights."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import functional as TF

from dino_train.data.transforms import BICUBIC
from dino_train.measure.attention import denormalize, prepare_image, summarize, unwrap_vit, vit_patch_size
from dino_train.measure.jaccard import JaccardResult, folder_jaccard
from dino_train.runtime.device import model_device
from eval.attention.figures import attention_figure, open_image

ImageInput = Image.Image | str | Path | Tensor


@dataclass
class AttentionMaps:
    """The CLS token's attention over the patch grid (h = H / patch, w = W / patch) of one image.

    Attention values are softmax probabilities of the CLS query (a head's map sums to 1 minus its
    attention to the CLS token itself).
    """

    heads: np.ndarray  # (heads, h, w) float32, one map per attention head
    mean: np.ndarray  # (h, w) float32, the mean over heads
    masks: np.ndarray | None  # (heads, h, w) bool: per head, the fewest patches holding `threshold` of it
    mean_mask: np.ndarray | None  # (h, w) bool: the same for the mean map; both None without a threshold
    image: np.ndarray  # (H, W, 3) uint8, the image as the model saw it (resized, cropped to the patch)
    patch_size: int  # pixels per patch side: map cell (i, j) covers image[i*p:(i+1)*p, j*p:(j+1)*p]
    threshold: float | None

    def upsampled(self, maps: np.ndarray) -> np.ndarray:
        """(..., h, w) maps or masks -> (..., H, W), each patch's value repeated over its pixels."""
        return np.repeat(np.repeat(maps, self.patch_size, axis=-2), self.patch_size, axis=-1)


def to_model_input(image: ImageInput, patch_size: int, image_size: int | None = None) -> Tensor:
    """One image -> (1, 3, H, W) ImageNet-normalised float32, H and W multiples of ``patch_size``.

    ``image``: a PIL image, an image file path, or an already normalised tensor (3, H, W) / (1, 3, H, W).
    ``image_size`` (None or 0: keep) is the short side in pixels after a bicubic resize. The crop to
    whole patches keeps the top-left corner, as ``visualize_attention`` does.
    """
    if isinstance(image, Tensor):
        x = image.unsqueeze(0) if image.ndim == 3 else image
        if x.ndim != 4 or x.shape[:2] != (1, 3):
            raise ValueError(f"an image tensor must be (3, H, W) or (1, 3, H, W); got {tuple(image.shape)}")
        x = x.float()
        if image_size:
            x = TF.resize(x, image_size, interpolation=BICUBIC, antialias=True)
        h, w = x.shape[-2] - x.shape[-2] % patch_size, x.shape[-1] - x.shape[-1] % patch_size
        if h == 0 or w == 0:
            size = f"{x.shape[-1]}x{x.shape[-2]}"
            raise ValueError(f"image of {size} px is smaller than one {patch_size} px patch")
        return x[..., :h, :w]
    if isinstance(image, str | Path):
        image = open_image(Path(image))
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, a path or a tensor; got {type(image).__name__}")
    return prepare_image(image, image_size, patch_size)


@torch.no_grad()
def attention_maps(
    model: nn.Module,
    image: ImageInput,
    threshold: float | None = None,
    image_size: int | None = None,
    block: int = -1,
) -> AttentionMaps:
    """The CLS self-attention of ``blocks[block]`` (default: the last) on one image.

    ``image``: a PIL image, a path, or a normalised tensor (3, H, W) / (1, 3, H, W). ``image_size``: short
    side in pixels after resizing (None: as given). ``threshold`` in [0, 1]: also return the masks of the
    DINO paper (the most attended patches holding that share of the attention). ``model``: a ViT, e.g.
    from :func:`dino.load_backbone`; it runs on its own device.
    """
    p = vit_patch_size(model)
    x = to_model_input(image, p, image_size).to(model_device(model))
    # summarize always thresholds; without a threshold the masks are simply not returned.
    s = summarize(model, x, 0.6 if threshold is None else threshold, block)
    rgb = (denormalize(x)[0] * 255).round().byte().permute(1, 2, 0)
    return AttentionMaps(
        heads=s.heads[0].cpu().numpy(),
        mean=s.mean[0, 0].cpu().numpy(),
        masks=s.head_masks[0].cpu().numpy() if threshold is not None else None,
        mean_mask=s.mean_mask[0, 0].cpu().numpy() if threshold is not None else None,
        image=rgb.cpu().numpy(),
        patch_size=p,
        threshold=threshold,
    )


def plot_attention(
    model: nn.Module,
    image: ImageInput | Sequence[ImageInput],
    threshold: float = 0.6,
    image_size: int | None = None,
    block: int = -1,
) -> Figure:
    """A matplotlib figure of the attention on one image or a list of them (sizes may differ), the one
    ``visualize_attention`` saves as ``grid.png``: per image a row with the image, the head-mean attention
    and each head's attention, and a row with the mean mask on the image, the mean mask and each head's
    mask (``threshold`` of the attention mass). In a notebook, run ``%matplotlib inline`` once so a
    returned figure is drawn.
    """
    images = list(image) if isinstance(image, list | tuple) else [image]
    if not images:
        raise ValueError("no image to plot")
    p = vit_patch_size(model)
    return attention_figure(model, [to_model_input(im, p, image_size) for im in images], threshold, block)


def attention_jaccard(
    model: nn.Module,
    images_dir: str | Path,
    masks_dir: str | Path,
    image_size: int | None = None,
    threshold: float = 0.6,
) -> JaccardResult:
    """How well the CLS attention of ``blocks[-1]`` segments objects, as ``eval_attention`` scores it,
    over the images under ``images_dir`` that have a mask at the same relative path under ``masks_dir``
    (a label map: 0 background, one value per object; a binary mask is one object). Each head's
    attention is thresholded to the fewest patches holding ``threshold`` of its mass; the headline,
    ``.best_head_per_object``, is the paper's rule: for each object the head whose mask has the best
    Jaccard index (%) with it, averaged over the image's objects, then over images. Named apart beside it:
    ``.head_mean_mask`` (the head-mean attention's mask against all of an image's objects), ``.per_head``
    (each head's own), ``.references`` (two maps without a model, by the paper's rule: the other masks'
    mean and attention even on each object), ``.by_brightness()`` (the paper's rule apart over objects
    brighter and darker than the rest of their image), and each image's and object's own scores
    (``.per_image_paper``, ``.per_object``), the images in sorted path order. ``image_size``: short side
    after resizing (None: as stored). ``model`` runs on its own device.
    """
    for name, folder in (("images_dir", images_dir), ("masks_dir", masks_dir)):
        if not Path(folder).is_dir():
            raise ValueError(f"{name} {folder} is not a folder")
    return folder_jaccard(unwrap_vit(model), Path(images_dir), Path(masks_dir), image_size, threshold)
