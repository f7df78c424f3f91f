"""One backbone's scores on a labelled train/ + val/ folder, as the demo and the recipe sweep report
them: weighted k-NN (k = 10, 20), a linear probe on cached, standardised features, and, for a ViT on a
folder with ``val_masks/``, the attention Jaccard of the paper.

The scorecard sees the whole image: it resizes to ``size`` and centre-crops ``size`` (``eval_knn
--resize 64 --crop 64`` on the 64 px embedded set), where every tool's default, the release's
Resize(256) + CenterCrop(224) rule, would keep the central 87.5% of each side. It says so when it runs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dino_train.data import eval_transform
from dino_train.data.embedded import MASKS
from dino_train.data.labelled import class_folders
from dino_train.data.transforms import resize_for
from dino_train.measure.features import extract_features
from dino_train.measure.jaccard import BRIGHTER, DARKER, folder_jaccard
from dino_train.measure.knn_bank import evaluate_knn
from dino_train.models.loading import input_bands
from eval.linear.model import backbone_tokens, default_variant, max_blocks, variant_features
from eval.linear.train import train_probe_in_memory

# The scorecard's Jaccard rows: the paper's rule first (for each object the best head's 60% mask), then
# the head-mean attention's mask against the objects, named apart so that no one mistakes one for the other.
JACCARD = "Jaccard, paper's rule"
JACCARD_HEAD_MEAN = "Jaccard, head-mean mask"
# The paper's rule apart over the objects brighter and darker than the rest of their image.
JACCARD_GROUPS = {BRIGHTER: f"Jaccard, {BRIGHTER}", DARKER: f"Jaccard, {DARKER}"}
JACCARD_BRIGHTER, JACCARD_DARKER = JACCARD_GROUPS[BRIGHTER], JACCARD_GROUPS[DARKER]


def sizes_line(size: int) -> str:
    """The preprocessing in words and as the command-line flags that reproduce it."""
    return (
        f"scorecard images: resized to {size} px and centre-cropped to {size} px, the whole image "
        f"(eval_knn / eval_linear --resize {size} --crop {size}; dino.extract_features(image_size={size}, "
        f"resize={size}))"
    )


def evaluate_linear(
    backbone: torch.nn.Module,
    train_root: str | Path,
    val_root: str | Path,
    n_last_blocks: int | None = None,
    avgpool: bool | None = None,
    lr: float = 0.3,
    epochs: int = 50,
    resize: int | None = None,
    crop: int = 224,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    standardized: bool = True,
) -> float:
    """Val top-1 % of one linear probe on cached centre-crop features (``--cached-features``), last epoch,
    on features standardised by the train split's statistics (``standardized``: ``eval_linear
    --standardize``, see :func:`eval.linear.model.feature_stats`).

    n_last_blocks/avgpool default to the release's variant for the backbone's width. ``lr`` is for a
    batch of 256; the release's 0.001 is tuned for ImageNet's thousands of steps per epoch, a few thousand
    images need a much larger one. The last epoch is reported, so no epoch is chosen on val. Images:
    bicubic resize of the short side to ``resize`` px (None: crop * 256 / 224), centre crop.
    """
    n_default, pool_default = default_variant(int(backbone.embed_dim))
    n = min(n_default if n_last_blocks is None else n_last_blocks, max_blocks(backbone))
    pool = pool_default if avgpool is None else avgpool
    tf = eval_transform(resize=resize or resize_for(crop), crop=crop)
    data = class_folders(train_root, val_root, tf, tf)
    backbone = backbone.to(device)
    splits = []
    for ds in (data.train, data.val):
        tokens, labels = extract_features(
            backbone,
            ds,
            batch_size,
            0,
            device,
            progress=False,
            fn=lambda m, x: backbone_tokens(m, x, n).flatten(1),
        )
        splits += [variant_features(tokens.view(len(labels), n + 1, -1), n, pool), data.remap(ds, labels)]
    _, tracker = train_probe_in_memory(
        *splits, len(data.classes), epochs, lr, batch_size, device=device, standardize=standardized
    )
    return float(tracker.last(0)["top1"])


def score_backbone(model: nn.Module, root: str | Path, size: int, verbose: bool = True) -> dict[str, float]:
    """Top-1 % of k-NN and a linear probe on ``root/val`` (images resized and centre-cropped to ``size``:
    the whole image when it is that size), and the attention Jaccard % on the val images that have a mask
    in ``root/val_masks`` (ViTs only; absent otherwise): the paper's rule (``JACCARD``), the same apart over
    the objects brighter and darker than the rest of their image, and the head-mean mask's.
    ``verbose``: print the sizes."""
    root = Path(root)
    if input_bands(model) != 3:
        raise ValueError(
            f"the scorecard reads RGB images and masks; this backbone takes {input_bands(model)} bands "
            "(score multi-band backbones with eval_knn and eval_linear, docs/multiband.md)"
        )
    if verbose:
        print(sizes_line(size), flush=True)
    knn = evaluate_knn(
        model, root / "train", root / "val", ks=(10, 20), resize=size, crop=size, batch_size=128
    )
    scores = {f"k-NN k={k}": top1 for k, (top1, _) in knn.items()}
    scores["linear probe"] = evaluate_linear(model, root / "train", root / "val", resize=size, crop=size)
    if (root / MASKS).is_dir() and hasattr(model, "blocks"):
        result = folder_jaccard(model, root / "val", root / MASKS)
        scores[JACCARD] = result.best_head_per_object
        scores.update({JACCARD_GROUPS[group]: j for group, j in result.by_brightness().items()})
        scores[JACCARD_HEAD_MEAN] = result.head_mean_mask
    return scores
