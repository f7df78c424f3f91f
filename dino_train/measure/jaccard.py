"""How well a ViT's CLS attention segments objects, as the DINO paper measures it: the Jaccard index
(intersection over union) between the mask of the fewest patches holding 60% of the attention mass and
the object's mask, per head and for the head mean, averaged over images.

Two references without a model come with it (``reference_jaccards``), because the number alone does not
say whether the attention found each image's object: a map that only knows where the objects of a set
usually are can score high when they sit near the centre (47.3 on the embedded set at patch 8, close to
the 60.5 of attention spread evenly over each object), and attention on the object's outline scores low."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import functional as TF

from dino_train.data import IMAGE_EXTENSIONS
from dino_train.data.datasets import load_rgb
from dino_train.data.transforms import BICUBIC
from dino_train.measure.attention import (
    denormalize,
    prepare_image,
    summarize,
    threshold_masks,
    upsample,
    vit_patch_size,
)


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
    references: dict[str, float] = field(default_factory=dict)  # reference_jaccards of the same masks
    # Each image's own scores (%), in input order: the averages hide which images the attention misses
    # (on the embedded set, attention that follows brightness scores near the ceiling where the object is
    # the brighter region and near 0 where it is not). Left out of as_dict: the log keeps the averages.
    per_image: list[float] = field(default_factory=list)  # the head-mean mask's Jaccard
    per_image_heads: list[list[float]] = field(default_factory=list)  # each head's
    object_brighter: list[bool | None] = field(default_factory=list)  # per image: see object_is_brighter
    # The (image, mask) files scored, in the same order, when they came from a folder (folder_jaccard).
    files: list[tuple[Path, Path]] = field(default_factory=list)

    def brightness_groups(self) -> dict[str, list[float]]:
        """The per-image head-mean scores of the images whose object is brighter than the rest of the
        image (``BRIGHTER``) and of those where it is darker (``DARKER``); images whose mask is empty or
        full are in neither, and a group without images is left out."""
        groups: dict[str, list[float]] = {BRIGHTER: [], DARKER: []}
        for score, brighter in zip(self.per_image, self.object_brighter, strict=True):
            if brighter is not None:
                groups[BRIGHTER if brighter else DARKER].append(score)
        return {name: scores for name, scores in groups.items() if scores}

    def by_brightness(self) -> dict[str, float]:
        """The head-mean Jaccard (%) averaged over each of ``brightness_groups``. Attention that lights
        the brighter region, not the object, scores high in one group and near 0 in the other."""
        return {name: sum(v) / len(v) for name, v in self.brightness_groups().items()}

    def brightness_counts(self) -> dict[str, int]:
        """How many images each of ``brightness_groups`` holds."""
        return {name: len(v) for name, v in self.brightness_groups().items()}

    def as_dict(self) -> dict:
        return {
            "mean": self.mean,
            "per_head": self.per_head,
            "best_head": self.best_head,
            "images": self.images,
            "references": self.references,
            "by_brightness": self.by_brightness(),
            "by_brightness_images": self.brightness_counts(),
        }


PRIOR = "masks_mean"  # the keys of reference_jaccards (JSON keys too)
EVEN = "even_on_object"
BRIGHTER, DARKER = "object brighter", "object darker"  # the keys of JaccardResult.by_brightness
_CANVAS = 64  # side of the square the masks are averaged on, whatever their sizes


def _mask_jaccard(attention: Tensor, mask: Tensor, patch: int, threshold: float) -> float:
    """Jaccard of the ``threshold`` mask of one (h, w) attention-like map with the (h*p, w*p) object mask.
    A map with no mass (an empty mask's) spreads it evenly: a model's attention always keeps some patch."""
    if not attention.sum() > 0:
        attention = torch.ones_like(attention)
    keep = threshold_masks(attention[None, None], threshold)[0, 0]
    return float(jaccard(upsample(keep[None, None], patch)[0, 0], mask))


def reference_jaccards(masks: Sequence[Tensor], patch: int, threshold: float = 0.6) -> dict[str, float]:
    """The measure of :func:`attention_jaccard` (%) for maps that need no model, on the same masks
    ((H, W) bool, H and W multiples of ``patch``):

    - ``EVEN``: attention spread evenly over each image's own object (each patch weighted by the share of
      its pixels inside the object): what attention wholly on the object scores under the threshold rule,
      at most 100 and below it for objects that span several patches.
    - ``PRIOR`` (with two masks or more): one map for every image, the mean of the *other* images' masks
      (each resized to a common square first): where the set's objects usually are. Attention that finds
      each image's own object beats it; a centred blob on a set of centred objects matches it.
    """
    if not masks:
        raise ValueError("need at least one mask")
    for m in masks:
        if m.ndim != 2 or m.shape[0] % patch or m.shape[1] % patch:
            raise ValueError(f"masks must be (H, W) with H and W multiples of {patch}; got {tuple(m.shape)}")
    masks = [m.detach().cpu().bool() for m in masks]
    refs = {EVEN: _mean(_mask_jaccard(_pool(m, patch), m, patch, threshold) for m in masks)}
    if len(masks) > 1:
        canvas = torch.stack([_resize(m.float(), (_CANVAS, _CANVAS), "area") for m in masks])
        total = canvas.sum(0)
        scores = []
        for own, m in zip(canvas, masks, strict=True):
            others = (total - own) / (len(masks) - 1)
            prior = _pool(_resize(others, tuple(m.shape), "bilinear"), patch)
            scores.append(_mask_jaccard(prior, m, patch, threshold))
        refs[PRIOR] = _mean(scores)
    return refs


def _resize(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(x[None, None], size=size, mode=mode, **kwargs)[0, 0]


def _pool(pixels: Tensor, patch: int) -> Tensor:
    """(H, W) -> (H/p, W/p): each patch's mean (of a bool mask: its share of object pixels)."""
    return F.avg_pool2d(pixels[None, None].float(), patch)[0, 0]


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return 100 * sum(values) / len(values)


def object_is_brighter(image: Tensor, mask: Tensor) -> bool | None:
    """Whether the object's mean luminance (Rec. 601 luma of the de-normalised RGB) is above the rest of
    the image's. ``image``: ImageNet-normalised (1, 3, H, W); ``mask``: bool (H, W). None when the mask
    is empty or full: nothing to compare."""
    mask = mask.cpu().bool()
    if not 0 < int(mask.sum()) < mask.numel():
        return None
    rgb = denormalize(image.float().cpu())[0]
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return bool(luma[mask].mean() > luma[~mask].mean())


def describe_references(refs: dict[str, float]) -> str:
    """The references in words, as the demo and the training monitor print them."""
    parts = []
    if PRIOR in refs:
        parts.append(f"{refs[PRIOR]:.1f} for the other masks' mean (where objects usually are)")
    parts.append(f"{refs[EVEN]:.1f} for attention even on each object")
    return "without a model: " + ", ".join(parts)


@torch.no_grad()
def attention_jaccard(
    model: nn.Module, images: Sequence[Tensor], masks: Sequence[Tensor], threshold: float = 0.6
) -> JaccardResult:
    """``images``: normalised (1, 3, H, W) tensors (H, W multiples of the patch size); ``masks``: bool
    (H, W) object masks at the same size. The attention masks are nearest-upsampled to pixels. The result's
    ``references`` are :func:`reference_jaccards` of the same masks."""
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
    heads_t, means_t = 100 * torch.stack(heads).cpu(), 100 * torch.stack(means).cpu()
    per_head = heads_t.mean(0).tolist()
    refs = reference_jaccards(masks, p, threshold)
    brighter = [object_is_brighter(img, mask) for img, mask in zip(images, masks, strict=True)]
    return JaccardResult(
        mean=float(means_t.mean()),
        per_head=per_head,
        best_head=max(per_head),
        images=len(images),
        references=refs,
        per_image=means_t.tolist(),
        per_image_heads=heads_t.tolist(),
        object_brighter=brighter,
    )


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
    return load_pairs(paired_files(Path(images_dir), Path(masks_dir)), patch, image_size)


def load_pairs(
    pairs: Sequence[tuple[Path, Path]], patch: int, image_size: int | None = None
) -> tuple[list[Tensor], list[Tensor]]:
    """``load_masked_images`` of the (image, mask) files of ``paired_files``, in their order."""
    images, masks = [], []
    for img_path, mask_path in pairs:
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
    pairs = paired_files(Path(images_dir), Path(masks_dir))
    images, masks = load_pairs(pairs, vit_patch_size(model), image_size)
    return replace(attention_jaccard(model, images, masks, threshold), files=pairs)
