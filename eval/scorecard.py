"""One backbone's scores on a labelled train/ + val/ folder, as the demo and the recipe sweep report
them: weighted k-NN (k = 10, 20), a linear probe on cached features, and, for a ViT on a folder with
``val_masks/``, the attention Jaccard of the paper."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from eval.attention_jaccard import folder_jaccard
from eval.knn_eval import evaluate_knn
from eval.linear_eval import evaluate_linear

MASKS = "val_masks"


def score_backbone(model: nn.Module, root: str | Path, size: int) -> dict[str, float]:
    """Top-1 % of k-NN and a linear probe on ``root/val`` (images resized and centre-cropped to ``size``,
    the whole image when it is that size), and the head-mean attention Jaccard % on the val images that
    have a mask in ``root/val_masks`` (ViTs only; absent otherwise)."""
    root = Path(root)
    knn = evaluate_knn(
        model, root / "train", root / "val", ks=(10, 20), resize=size, crop=size, batch_size=128
    )
    scores = {f"k-NN k={k}": top1 for k, (top1, _) in knn.items()}
    scores["linear probe"] = evaluate_linear(model, root / "train", root / "val", resize=size, crop=size)
    if (root / MASKS).is_dir() and hasattr(model, "blocks"):
        scores["attention Jaccard"] = folder_jaccard(model, root / "val", root / MASKS).mean
    return scores
