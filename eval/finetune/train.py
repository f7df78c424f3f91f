"""The fine-tuning loop's parts: augmentation, the per-step lr, one epoch of AdamW steps, the sharded
validation, and the checkpoint a run resumes from.

Every epoch reseeds torch, numpy and ``random`` from (seed, epoch, rank) before its data loader starts
its workers, so the augmentations, mixup and drop path of an epoch do not depend on what ran before it:
a run resumed from its checkpoint continues exactly as the uninterrupted run would have (on the same
hardware and thread count).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup, create_transform
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from dino_train.core.schedules import cosine_schedule
from dino_train.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dino_train.measure.features import extract_features
from dino_train.runtime.files import CheckpointError, atomic_save
from dino_train.runtime.precision import autocast
from dino_train.runtime.progress import use_progress_bar
from dino_train.runtime.safe_load import load_verified
from eval.linear.model import topk_correct

CHECKPOINT_FILE = "finetune_checkpoint.pth"


def check_randaugment(spec: str) -> None:
    """Refuse a RandAugment spec that can crash mid-epoch: with ``inc1`` and a magnitude that may reach 10
    (``m10``, or any ``mstd`` noise), timm's increasing posterize asks Pillow for 0 bits, which Pillow
    refuses. ``mmax9`` caps the magnitude at 9 (the default spec does)."""
    parts = spec.split("-")
    if not spec.startswith("rand") and spec != "none":
        raise ValueError(f"--randaugment {spec!r}: expected 'none' or timm's 'rand-m9-mstd0.5-...' spelling")
    reaches_ten = any(p.startswith("mstd") for p in parts) or "m10" in parts
    if "inc1" in parts and reaches_ten and not any(p.startswith("mmax") for p in parts):
        raise ValueError(
            f"--randaugment {spec}: with inc1 the magnitude may reach 10, where timm's posterize asks "
            "Pillow for 0 bits and the run crashes mid-epoch; add -mmax9 (e.g. rand-m9-mstd0.5-inc1-mmax9)"
        )


def train_transform(crop: int, randaugment: str, reprob: float) -> Callable[[Any], torch.Tensor]:
    """DeiT's fine-tuning augmentation through timm: RandomResizedCrop (scale 0.08-1, bicubic), flip,
    RandAugment (``randaugment`` as timm spells it, "none" for colour jitter 0.4 instead), normalisation,
    random erasing with probability ``reprob``."""
    check_randaugment(randaugment)
    return create_transform(
        crop,
        is_training=True,
        auto_augment=None if randaugment == "none" else randaugment,
        interpolation="bicubic",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        re_prob=reprob,
        re_mode="pixel",
    )


def make_mixup(mixup: float, cutmix: float, smoothing: float, num_classes: int) -> Mixup | None:
    """timm's batch mixup / cutmix (each batch draws one of them when both are on), or None when off.
    It also smooths the labels, so the loss then takes soft targets."""
    if mixup <= 0 and cutmix <= 0:
        return None
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=smoothing, num_classes=num_classes)


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed every generator the epoch draws from: augmentations (torch and ``random``; loader workers
    derive theirs from torch's), mixup (numpy), drop path (torch)."""
    s = (seed * 1_000_003 + epoch * 1009 + rank) % 2**32
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def train_loader(
    dataset: Dataset, batch_size: int, workers: int, seed: int, rank: int, world: int, cuda: bool
) -> DataLoader:
    """This rank's shuffled shard (``loader.sampler.set_epoch`` each epoch). Workers are not kept between
    epochs, so each epoch's workers are seeded from that epoch's seed (see :func:`seed_epoch`)."""
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=cuda, drop_last=False
    )


def lr_schedule(
    base: float, final: float, epochs: int, steps_per_epoch: int, warmup_epochs: int
) -> torch.Tensor:
    """The lr of every step (float64, epochs * steps_per_epoch): linear warmup from 0 over
    ``warmup_epochs`` (at most half the run, so a short run still decays), then a cosine to ``final``;
    the same schedule function pretraining uses."""
    return cosine_schedule(base, final, epochs, steps_per_epoch, min(warmup_epochs, epochs // 2))


@dataclass
class StepSettings:
    """What every training step needs besides the model, the batch and the optimizer."""

    precision: str  # fp32, bf16 or fp16 (autocast; fp16 with the scaler)
    device: torch.device
    smoothing: float = 0.0  # label smoothing without mixup (with mixup, Mixup smooths the targets)
    mixup: Mixup | None = None
    clip_grad: float = 0.0  # max gradient norm; 0: no clipping
    scaler: torch.amp.GradScaler | None = None


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    lrs: torch.Tensor,
    first_step: int,
    step: StepSettings,
    progress: bool = False,
) -> float:
    """One pass over this rank's shard; step ``first_step + i`` uses ``lrs[first_step + i]`` times each
    group's ``lr_scale``. Returns the mean training loss over the steps."""
    model.train()
    total, steps = 0.0, 0
    bar = tqdm(loader, desc="finetune", unit="batch", disable=not (progress and use_progress_bar()))
    for images, labels in bar:
        images, labels = images.to(step.device, non_blocking=True), labels.to(step.device, non_blocking=True)
        if step.mixup is not None and len(images) % 2:  # timm's batch mixup pairs images: drop the odd one
            images, labels = images[:-1], labels[:-1]
        if len(images) == 0:
            continue
        lr = float(lrs[min(first_step + steps, len(lrs) - 1)])
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        total += _step(model, images, labels, optimizer, step)
        steps += 1
    return total / max(steps, 1)


def _loss(
    logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None, smoothing: float
) -> torch.Tensor:
    if targets is not None:  # mixup's soft targets (B, C)
        return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, labels, label_smoothing=smoothing)


def _step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    s: StepSettings,
) -> float:
    targets = None
    if s.mixup is not None:
        images, targets = s.mixup(images, labels)  # targets (B, C), already label-smoothed
    with autocast(s.precision, s.device):
        logits = model(images)
    loss = _loss(logits.float(), labels, targets, s.smoothing)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the fine-tuning loss is {loss.item()}: lower --lr or use --precision fp32")
    optimizer.zero_grad(set_to_none=True)
    (s.scaler.scale(loss) if s.scaler is not None else loss).backward()
    if s.scaler is not None:
        s.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    if s.clip_grad > 0:
        nn.utils.clip_grad_norm_(model.parameters(), s.clip_grad)
    if s.scaler is not None:
        s.scaler.step(optimizer)
        s.scaler.update()
    else:
        optimizer.step()
    return float(loss.detach())


def validate(
    model: nn.Module,
    dataset: Dataset,
    remap: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int,
    workers: int,
    device: torch.device,
    precision: str,
) -> dict[str, float]:
    """Top-1 and top-5 % of ``model`` (the unwrapped module) on every val image: each rank classifies a
    shard, the logits are gathered, so every rank gets the same numbers (no image counted twice, unlike a
    padded DistributedSampler). ``remap``: the dataset's labels -> the run's class indices."""

    def logits(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with autocast(precision, device):
            return m(x).float()

    out, labels = extract_features(model, dataset, batch_size, workers, device, progress=False, fn=logits)
    top1, top5 = topk_correct(out, remap(labels))
    n = max(len(labels), 1)
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Written to a temporary file and renamed, with an embedded checksum: a run killed mid-save keeps
    the previous epoch's file."""
    atomic_save(state, path, checksum=True)


def load_checkpoint(path: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The state saved in ``path`` by a run with the same ``identity`` (the settings that shape the run),
    None when there is no file. Read with the safe loader (no code is unpickled); a run with other
    settings is a CheckpointError naming them."""
    if not path.is_file():
        return None
    state = load_verified(path)
    if not isinstance(state, dict) or "model" not in state or "identity" not in state:
        raise CheckpointError(f"{path} is not a fine-tuning checkpoint; use another --output-dir")
    differs = sorted(
        k for k in identity.keys() | state["identity"].keys() if state["identity"].get(k) != identity.get(k)
    )
    if differs:
        raise CheckpointError(
            f"{path} is from a run with other {', '.join(differs)}; use another --output-dir or --no-resume"
        )
    return state
