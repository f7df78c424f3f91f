"""Evaluation during pretraining, through ``eval``'s primitives: k-NN accuracy of the teacher, the
attention Jaccard against object masks where the k-NN data has them, and attention maps in TensorBoard,
each every few epochs, so quality (and collapse) shows while the run goes on, without a separate job."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from dino_train.config import Config, knn_sizes
from dino_train.data import DataError, ImageDataset, eval_transform
from dino_train.data.band_augment import eval_preprocess
from dino_train.data.bands import BandStats
from dino_train.data.embedded import MASKS
from dino_train.data.labelled import class_folders
from dino_train.measure.attention import colorize, denormalize, summarize, upsample, vit_patch_size
from dino_train.measure.jaccard import BRIGHTER, DARKER, attention_jaccard, describe_references
from dino_train.measure.knn_bank import classify_bank, extract_bank
from dino_train.measure.masks import load_masked_images
from dino_train.models.backbone import NotAViTError
from dino_train.monitor.logger import Monitor

if TYPE_CHECKING:  # the loop calls these hooks; monitor never imports the loop
    from dino_train.train.state import TrainState


class EpochHook:
    """A hook of the training loop that acts at epoch ends only."""

    def after_step(self, ev: object) -> None:
        pass


@dataclass
class PeriodicKNN(EpochHook):
    """k-NN top-1/top-5 of the teacher backbone on a train/ + val/ class-folder pair every ``every``
    epochs: features sharded over ranks, every rank classifies (faiss on the CPU)."""

    cfg: Config
    monitor: Monitor
    device: torch.device
    stats: BandStats | None = None  # a multi-band run's data.band_stats

    def __post_init__(self) -> None:
        root = Path(self.cfg.monitor.knn_data)
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise DataError(f"monitor.knn_data: {root / split} is not a folder (need train/ and val/)")
        transform = eval_preprocess(self.stats, *knn_sizes(self.cfg))
        channels = None if self.stats is None else self.cfg.data.channels
        self.data = class_folders(root / "train", root / "val", transform, transform, channels)

    def evaluate(self, backbone: nn.Module) -> dict[int, tuple[float, float]]:
        mon = self.cfg.monitor
        bank = extract_bank(backbone, self.data, mon.knn_batch_size, 0, self.device, progress=False)
        return classify_bank(bank, mon.knn_ks, mon.knn_temperature, use_gpu=False)

    def after_epoch(self, state: TrainState, epoch: int) -> None:
        if (epoch + 1) % self.cfg.monitor.knn_every_epochs:
            return
        accuracy = self.evaluate(state.mods.teacher.backbone)
        top1 = {f"knn_top1_k{k}": a[0] for k, a in accuracy.items()}
        self.monitor.scalars(state.step, top1, prefix="knn")
        top5 = {f"knn_top5_k{k}": a[1] for k, a in accuracy.items()}
        self.monitor.record("knn", state.step, {"epoch": epoch, **top1, **top5})
        shown = ", ".join(f"k={k}: {a[0]:.1f}%" for k, a in accuracy.items())
        self.monitor.message(f"epoch {epoch}: k-NN top-1 {shown}")


# TensorBoard tags (under attention/) of JaccardResult.by_brightness's groups (the paper's rule).
BRIGHTNESS_TAGS = {BRIGHTER: "jaccard_object_brighter", DARKER: "jaccard_object_darker"}


@dataclass
class PeriodicJaccard(EpochHook):
    """The paper's attention Jaccard (the head-mean 60% mask against the object mask, and each head's) of
    the teacher on the val/ images of ``monitor.knn_data`` that have a mask in its val_masks/, at the
    k-NN's epochs, the images resized to the k-NN's crop size (rank 0; ViT backbones only). It shows
    whether the attention settles on the objects as the run goes on, as k-NN shows the features."""

    cfg: Config
    monitor: Monitor
    images: list[Tensor]
    masks: list[Tensor]

    @classmethod
    def for_run(cls, cfg: Config, monitor: Monitor, backbone: nn.Module) -> PeriodicJaccard | None:
        """The hook when ``monitor.knn_data`` has a ``val_masks/`` folder and the backbone is a ViT;
        otherwise None (no masks, nothing to measure)."""
        root = Path(cfg.monitor.knn_data)
        if not cfg.monitor.knn_data or not (root / MASKS).is_dir():
            return None
        try:
            patch = vit_patch_size(backbone)
        except NotAViTError:
            return None
        images, masks = load_masked_images(root / "val", root / MASKS, patch, knn_sizes(cfg)[1])
        return cls(cfg, monitor, images, masks)

    def after_epoch(self, state: TrainState, epoch: int) -> None:
        if (epoch + 1) % self.cfg.monitor.knn_every_epochs:
            return
        result = attention_jaccard(state.mods.teacher.backbone, self.images, self.masks)
        heads = {f"jaccard_head{i}": v for i, v in enumerate(result.per_head)}
        split = result.by_brightness()  # attention drawn to bright regions shows as a gap between the two
        by_group = {BRIGHTNESS_TAGS[group]: v for group, v in split.items()}
        scalars = {"jaccard_best_head_per_object": result.best_head_per_object, **by_group,
                   "jaccard_head_mean_mask": result.head_mean_mask, **heads}  # fmt: skip
        self.monitor.scalars(state.step, scalars, prefix="attention")
        self.monitor.record("jaccard", state.step, {"epoch": epoch, **result.as_dict()})
        per_head = " / ".join(f"{v:.1f}" for v in result.per_head)
        groups = ", ".join(f"{group} {v:.1f}" for group, v in split.items())
        self.monitor.message(
            f"epoch {epoch}: attention Jaccard {result.best_head_per_object:.1f}% (best head per object, the "
            f"paper's rule; {groups}; head-mean mask {result.head_mean_mask:.1f}, per head {per_head}) on "
            f"{result.objects} objects in {result.images} masked val images; "
            f"{describe_references(result.references)}"
        )


def fixed_images(folder: str | Path, size: int, limit: int = 4) -> Tensor:
    """Up to ``limit`` images of ``folder`` (class folders or flat), resized and centre-cropped to ``size``
    (a multiple of the patch size) and normalised: (B, 3, size, size). The same images every call."""
    ds = ImageDataset(folder, eval_transform(size, size))
    step = max(len(ds) // limit, 1)  # spread over the classes rather than the first few files
    return torch.stack([ds[i][0] for i in range(0, len(ds), step)][:limit])


def attention_panels(model: nn.Module, images: Tensor, block: int = -1) -> Tensor:
    """Normalised (B, 3, H, W) images -> (B, 3, H, 2W) RGB in [0, 1]: the image, then its head-mean CLS
    attention (nearest-upsampled, inferno). H and W must be multiples of the patch size."""
    s = summarize(model, images, block=block)
    heat = colorize(upsample(s.mean, images.shape[-1] // s.mean.shape[-1])[:, 0])
    return torch.cat([denormalize(images), heat], dim=-1)


@dataclass
class AttentionImages(EpochHook):
    """The teacher's head-mean CLS attention on a few fixed images, as TensorBoard images ``attention/i``
    every ``monitor.attention_every_epochs`` epochs (rank 0; ViT backbones only)."""

    cfg: Config
    monitor: Monitor

    def __post_init__(self) -> None:
        self.images = fixed_images(self.cfg.monitor.attention_images, self.cfg.data.global_crops_size)

    def after_epoch(self, state: TrainState, epoch: int) -> None:
        if (epoch + 1) % self.cfg.monitor.attention_every_epochs or self.monitor.writer is None:
            return
        model = state.mods.teacher.backbone
        device = next(model.parameters()).device
        for i, panel in enumerate(attention_panels(model, self.images.to(device)).cpu()):
            self.monitor.writer.add_image(f"attention/{i}", panel, global_step=state.step, dataformats="CHW")
