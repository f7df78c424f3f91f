"""The k-NN bank: both splits' CLS features and labels, and the release's weighted vote over them.

What ``eval_knn``, the training monitor, the demo's scorecard and ``dino.`` share: extraction once here,
classification by ``dino_train.measure.knn``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dino_train.data import eval_transform
from dino_train.data.labelled import ClassFolders, class_folders
from dino_train.data.transforms import resize_for
from dino_train.measure.feature_store import stream_features
from dino_train.measure.features import extract_features
from dino_train.measure.knn import knn_classify
from dino_train.measure.settings import KNN_KS, KNN_TEMPERATURE


def extract_bank(
    backbone: nn.Module,
    data: ClassFolders,
    batch_size: int,
    num_workers: int,
    device: torch.device | str,
    progress: bool = True,
    patch_dir: Path | None = None,
) -> dict[str, Any]:
    """Features and labels of both splits: train_feats (N, D), train_labels (N,), val_feats (M, D),
    val_labels (M,), labels indexing ``classes`` (shared by both splits). ``patch_dir``: also stream
    each split's patch tokens to the feature store ``patch_dir/<split>``
    (``dino_train.measure.feature_store``)."""
    backbone = backbone.to(device)
    bank: dict[str, Any] = {"classes": data.classes, "missing_from_train": data.missing_from_train}
    for split, ds in (("train", data.train), ("val", data.val)):
        if patch_dir is None:
            feats, labels = extract_features(backbone, ds, batch_size, num_workers, device, progress=progress)
        else:
            paths = [Path(p) for p, _ in ds.samples]
            args = (batch_size, num_workers, device, progress, paths)
            feats, labels = stream_features(backbone, ds, patch_dir / split, *args)
        bank[f"{split}_feats"] = feats
        bank[f"{split}_labels"] = data.remap(ds, labels)
    return bank


def evaluate_knn(
    backbone: nn.Module,
    train_root: str | Path,
    val_root: str | Path,
    ks: Sequence[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    batch_size: int = 64,
    num_workers: int = 0,
    resize: int | None = None,
    crop: int = 224,
    device: torch.device | str = "cpu",
) -> dict[int, tuple[float, float]]:
    """{k: (top-1 %, top-5 %)} of ``backbone``'s features on ``val_root`` with ``train_root`` as the bank.

    Images: bicubic resize of the short side to ``resize`` px (None: crop * 256 / 224), centre crop."""
    tf = eval_transform(resize=resize or resize_for(crop), crop=crop)
    data = class_folders(train_root, val_root, tf, tf)
    bank = extract_bank(backbone, data, batch_size, num_workers, device, progress=False)
    return classify_bank(bank, ks, temperature)


def classify_bank(
    bank: dict[str, Any], ks: Sequence[int], temperature: float, use_gpu: bool | None = None
) -> dict[int, tuple[float, float]]:
    """{k: (top-1 %, top-5 %)} of the val features against the train bank (see ``dino_train.measure.knn``)."""
    return knn_classify(
        bank["train_feats"],
        bank["train_labels"],
        bank["val_feats"],
        bank["val_labels"],
        num_classes=len(bank["classes"]),
        ks=ks,
        temperature=temperature,
        use_gpu=use_gpu,
    )
