"""How well a ViT's CLS attention segments objects, as the DINO paper measures it (Fig. 4; the first
author's code in facebookresearch/dino issue 54): each head's attention is thresholded to the fewest
patches holding 60% of its mass; for each ground-truth object the head whose mask has the best Jaccard
index (intersection over union) with the object counts; an image scores the mean over its objects, and
the result is the mean over images. That is ``best_head_per_object``, the headline.

Beside it, named apart so that no one mistakes one for the other: the head-mean attention's mask against
the image's foreground (all objects; ``head_mean_mask``), each head's own mask against it (``per_head``,
and ``best_single_head``, the best of those averages: one head for every image), and two references
without a model (``reference_jaccards``), because the number alone does not say whether the attention
found each image's object: a map that only knows where a set's objects usually are scores high when they
sit near the centre."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dino_train.measure.attention import (
    cls_attention_maps,
    denormalize,
    threshold_masks,
    upsample,
    vit_patch_size,
)
from dino_train.measure.masks import foreground, load_pairs, object_ids, object_masks, paired_files

PRIOR = "masks_mean"  # the keys of reference_jaccards (JSON keys too)
EVEN = "even_on_object"
BRIGHTER, DARKER = "object brighter", "object darker"  # the keys of the brightness split
PAPER_RULE = "best head per object (the paper's rule)"  # how tables name the headline
HEAD_MEAN_RULE = "head-mean mask"
_CANVAS = 64  # side of the square the masks are averaged on, whatever their sizes


def jaccard(a: Tensor, b: Tensor) -> Tensor:
    """Intersection over union of bool masks over the last two dims: (..., H, W) -> (...); 1 when both
    are empty."""
    inter = (a & b).flatten(-2).sum(-1).float()
    union = (a | b).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


@dataclass(frozen=True)
class ObjectScore:
    """One ground-truth object under the paper's rule: its image (index), its id in the mask, the best
    head's Jaccard (%) and which head that was, and whether the object is brighter than the rest of its
    image (None: nothing to compare)."""

    image: int
    object_id: int
    jaccard: float
    head: int
    brighter: bool | None


@dataclass
class JaccardResult:
    best_head_per_object: float  # the paper's rule (%): mean over images of the mean over their objects
    head_mean_mask: float  # the head-mean attention's mask against each image's foreground, mean over images
    per_head: list[float]  # each head's own mask against the foreground, mean over images
    best_single_head: float  # the best of per_head: one head for every image
    images: int
    objects: int = 0
    references: dict[str, float] = field(default_factory=dict)  # reference_jaccards of the same masks
    # Each image's and object's own scores, in input order: the averages hide which ones the attention
    # misses (attention that follows brightness scores near the ceiling where the object is the brighter
    # region and near 0 where it is not). Left out of as_dict: the log keeps the averages.
    per_image_paper: list[float | None] = field(default_factory=list)  # None: the image has no object
    per_image: list[float] = field(default_factory=list)  # the head-mean mask's Jaccard
    per_image_heads: list[list[float]] = field(default_factory=list)  # each head's
    per_object: list[ObjectScore] = field(default_factory=list)
    object_brighter: list[bool | None] = field(default_factory=list)  # per image: its whole foreground
    # The (image, mask) files scored, in the same order, when they came from a folder (folder_jaccard).
    files: list[tuple[Path, Path]] = field(default_factory=list)

    def brightness_groups(self) -> dict[str, list[float]]:
        """The paper's rule apart over the objects brighter than the rest of their image (``BRIGHTER``)
        and those darker (``DARKER``): each object's best-head Jaccard, by group; objects that fill their
        image or are empty are in neither, and a group without objects is left out."""
        groups: dict[str, list[float]] = {BRIGHTER: [], DARKER: []}
        for o in self.per_object:
            if o.brighter is not None:
                groups[BRIGHTER if o.brighter else DARKER].append(o.jaccard)
        return {name: scores for name, scores in groups.items() if scores}

    def by_brightness(self) -> dict[str, float]:
        """The paper's rule averaged over each of :meth:`brightness_groups`. Attention that lights the
        brighter region, not the object, scores high in one group and near 0 in the other."""
        return {name: sum(v) / len(v) for name, v in self.brightness_groups().items()}

    def brightness_counts(self) -> dict[str, int]:
        """How many objects each of :meth:`brightness_groups` holds."""
        return {name: len(v) for name, v in self.brightness_groups().items()}

    def head_mean_by_brightness(self) -> dict[str, float]:
        """The head-mean mask's per-image Jaccard averaged over the images whose foreground is brighter /
        darker than the rest (the split this project reported before the paper's rule)."""
        groups: dict[str, list[float]] = {BRIGHTER: [], DARKER: []}
        for score, brighter in zip(self.per_image, self.object_brighter, strict=True):
            if brighter is not None:
                groups[BRIGHTER if brighter else DARKER].append(score)
        return {name: sum(v) / len(v) for name, v in groups.items() if v}

    def as_dict(self) -> dict:
        return {
            "best_head_per_object": self.best_head_per_object,
            "head_mean_mask": self.head_mean_mask,
            "per_head": self.per_head,
            "best_single_head": self.best_single_head,
            "images": self.images,
            "objects": self.objects,
            "references": self.references,
            "by_brightness": self.by_brightness(),
            "by_brightness_objects": self.brightness_counts(),
            "head_mean_by_brightness": self.head_mean_by_brightness(),
        }


def _mask_jaccard(attention: Tensor, mask: Tensor, patch: int, threshold: float) -> float:
    """Jaccard of the ``threshold`` mask of one (h, w) attention-like map with the (h*p, w*p) object mask.
    A map with no mass (an empty mask's) spreads it evenly: a model's attention always keeps some patch."""
    if not attention.sum() > 0:
        attention = torch.ones_like(attention)
    keep = threshold_masks(attention[None, None], threshold)[0, 0]
    return float(jaccard(upsample(keep[None, None], patch)[0, 0], mask))


def _check_masks(masks: Sequence[Tensor], patch: int) -> None:
    for m in masks:
        if m.ndim != 2 or m.shape[0] % patch or m.shape[1] % patch:
            raise ValueError(f"masks must be (H, W) with H and W multiples of {patch}; got {tuple(m.shape)}")


def reference_jaccards(masks: Sequence[Tensor], patch: int, threshold: float = 0.6) -> dict[str, float]:
    """The paper's rule (%) for maps that need no model, on the same masks ((H, W) label maps or bool,
    H and W multiples of ``patch``; images without an object are left out):

    - ``EVEN``: attention spread evenly over each object (each patch weighted by the share of its pixels
      inside the object): what attention wholly on the object scores under the threshold rule, at most
      100 and below it for objects that span several patches.
    - ``PRIOR`` (with two masks or more): one map for every image, the mean of the *other* images'
      foregrounds (each resized to a common square first): where the set's objects usually are.
      Attention that finds each image's own objects beats it; a centred blob on centred objects matches it.
    """
    if not masks:
        raise ValueError("need at least one mask")
    _check_masks(masks, patch)
    objects = [object_masks(m.detach().cpu()) for m in masks]
    even = [_mean(_mask_jaccard(_pool(o, patch), o, patch, threshold) for o in objs) for objs in objects]
    refs = {EVEN: _mean_present(even)}
    if len(masks) > 1:
        fgs = [foreground(m.detach().cpu()) for m in masks]
        canvas = torch.stack([_resize(f.float(), (_CANVAS, _CANVAS), "area") for f in fgs])
        total, scores = canvas.sum(0), []
        for own, fg, objs in zip(canvas, fgs, objects, strict=True):
            prior = _pool(_resize((total - own) / (len(masks) - 1), tuple(fg.shape), "bilinear"), patch)
            scores.append(_mean(_mask_jaccard(prior, o, patch, threshold) for o in objs))
        refs[PRIOR] = _mean_present(scores)
    return refs


def _resize(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(x[None, None], size=size, mode=mode, **kwargs)[0, 0]


def _pool(pixels: Tensor, patch: int) -> Tensor:
    """(H, W) -> (H/p, W/p): each patch's mean (of a bool mask: its share of object pixels)."""
    return F.avg_pool2d(pixels[None, None].float(), patch)[0, 0]


def _mean(values: Iterable[float]) -> float | None:
    """100 x the mean; None for no values (an image without objects)."""
    values = list(values)
    return 100 * sum(values) / len(values) if values else None


def _mean_present(values: Iterable[float | None]) -> float:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else 0.0


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
    return "without a model, by the paper's rule: " + ", ".join(parts)


class ImageScores(NamedTuple):
    """One image's Jaccard indices (%): per object (in ``object_ids`` order) the best head's and which
    head that was (the paper's rule), then each head's and the head mean's mask against the foreground."""

    object_ids: list[int]
    best: Tensor  # (objects,)
    best_head: Tensor  # (objects,) long
    per_head: Tensor  # (heads,)
    head_mean: float


def score_attention(attn: Tensor, labels: Tensor, patch: int, threshold: float = 0.6) -> ImageScores:
    """The measures of one image from its CLS attention ``attn`` (heads, h, w) and its (h*p, w*p) label
    map ``labels`` (or bool mask): each head's ``threshold`` mask (the fewest patches holding that share
    of its mass), nearest-upsampled to pixels, against each object; the head mean's against all of them."""
    head_masks = upsample(threshold_masks(attn[None], threshold), patch)[0]
    mean_mask = upsample(threshold_masks(attn.mean(0)[None, None], threshold), patch)[0, 0]
    labels = labels.to(attn.device)
    objs = object_masks(labels)
    fg = objs.any(0) if len(objs) else torch.zeros_like(mean_mask)
    per_object = jaccard(head_masks[None], objs[:, None])  # (objects, heads)
    best, head = per_object.max(dim=1) if len(objs) else (per_object.new_zeros(0), per_object.new_zeros(0))
    return ImageScores(
        object_ids(labels), 100 * best.cpu(), head.long().cpu(), 100 * jaccard(head_masks, fg).cpu(),
        100 * float(jaccard(mean_mask, fg)),
    )  # fmt: skip


def _maps(model: nn.Module, images: Sequence[Tensor], device: torch.device, batch: int = 64) -> list[Tensor]:
    """Each image's CLS attention (heads, h, w), run in batches of consecutive images of one size: one
    image at a time, the forward passes were a third of a demo scorecard's time."""
    out: list[Tensor] = []
    start = 0
    while start < len(images):
        end = start + 1
        while end < len(images) and end - start < batch and images[end].shape == images[start].shape:
            end += 1
        out += cls_attention_maps(model, torch.cat(list(images[start:end])).to(device)).unbind(0)
        start = end
    return out


@torch.no_grad()
def attention_jaccard(
    model: nn.Module, images: Sequence[Tensor], masks: Sequence[Tensor], threshold: float = 0.6
) -> JaccardResult:
    """``images``: normalised (1, 3, H, W) tensors (H, W multiples of the patch size); ``masks``: (H, W)
    label maps (0 background, one id per object; see ``dino_train.measure.masks``) or bool object masks
    at the same size. The attention masks are nearest-upsampled to pixels. The result's ``references``
    are :func:`reference_jaccards` of the same masks."""
    if len(images) != len(masks) or not images:
        raise ValueError(f"need as many masks as images (and at least one); got {len(images)}, {len(masks)}")
    p = vit_patch_size(model)
    device = next(model.parameters()).device
    per_object, heads, means, paper = [], [], [], []
    for i, (img, labels, attn) in enumerate(zip(images, masks, _maps(model, images, device), strict=True)):
        scores = score_attention(attn, labels, p, threshold)
        objs = object_masks(labels.cpu())
        best = zip(scores.object_ids, scores.best.tolist(), scores.best_head.tolist(), objs, strict=True)
        per_object += [ObjectScore(i, oid, j, h, object_is_brighter(img, m)) for oid, j, h, m in best]
        heads.append(scores.per_head)
        means.append(scores.head_mean)
        paper.append(float(scores.best.mean()) if len(scores.best) else None)
    per_head = torch.stack(heads).mean(0).tolist()
    brighter = [object_is_brighter(img, foreground(m.cpu())) for img, m in zip(images, masks, strict=True)]
    return JaccardResult(
        best_head_per_object=_mean_present(paper),
        head_mean_mask=sum(means) / len(means),
        per_head=per_head,
        best_single_head=max(per_head),
        images=len(images),
        objects=len(per_object),
        references=reference_jaccards(masks, p, threshold),
        per_image_paper=paper,
        per_image=means,
        per_image_heads=torch.stack(heads).tolist(),
        per_object=per_object,
        object_brighter=brighter,
    )


def folder_jaccard(
    model: nn.Module, images_dir: Path, masks_dir: Path, image_size: int | None = None, threshold: float = 0.6
) -> JaccardResult:
    """``attention_jaccard`` over the images of a folder that have a mask in ``masks_dir`` (see
    ``dino_train.measure.masks.load_masked_images``)."""
    pairs = paired_files(Path(images_dir), Path(masks_dir))
    images, masks = load_pairs(pairs, vit_patch_size(model), image_size)
    return replace(attention_jaccard(model, images, masks, threshold), files=pairs)
