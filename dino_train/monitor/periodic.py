"""k-NN accuracy of the teacher during pretraining, so representation quality (and collapse) shows while
the run goes on, without a separate job."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dino_train.config import MonitorConfig
from dino_train.data import DataError, ImageDataset, eval_transform
from eval.features import extract_features
from eval.knn import knn_classify


class PeriodicKNN:
    """Holds the labelled train/val sets; ``evaluate`` embeds both with the given backbone (sharded over
    ranks) and returns {k: (top-1 %, top-5 %)} on every rank."""

    def __init__(self, cfg: MonitorConfig, global_crops_size: int, device: torch.device):
        root = Path(cfg.knn_data)
        crop = cfg.knn_crop or global_crops_size
        resize = cfg.knn_resize or round(global_crops_size * 256 / 224)
        transform = eval_transform(resize, crop)
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise DataError(f"monitor.knn_data: {root / split} is not a folder (need train/ and val/)")
        self.train_set = ImageDataset(root / "train", transform)
        self.val_set = ImageDataset(root / "val", transform)
        if not self.train_set.classes:
            raise DataError(f"monitor.knn_data: {root / 'train'} has no class folders, so no labels")
        self.cfg = cfg
        self.device = device

    def evaluate(self, backbone: nn.Module) -> dict[int, tuple[float, float]]:
        bs = self.cfg.knn_batch_size
        train_x, train_y = extract_features(backbone, self.train_set, bs, 0, self.device, progress=False)
        val_x, val_y = extract_features(backbone, self.val_set, bs, 0, self.device, progress=False)
        # Val labels follow the train classes by name; a class only in val cannot be predicted.
        names = self.train_set.classes
        remap = torch.tensor([names.index(c) if c in names else -1 for c in self.val_set.classes])
        val_y = remap[val_y]
        return knn_classify(
            train_x,
            train_y,
            val_x,
            val_y,
            len(names),
            self.cfg.knn_ks,
            self.cfg.knn_temperature,
            use_gpu=False,
        )
