"""Frozen-backbone feature extraction over a data set, shared across processes when a group is running.

Each rank embeds a strided shard (images rank, rank + world, ...), then the shards are all-gathered so every
rank ends with all features in data set order. Unlike the release, which gathered train features on rank 0
only and had every rank embed the whole val set, no rank repeats work and every rank can evaluate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from dino_train.runtime.distributed import is_distributed
from dino_train.runtime.files import CheckpointError
from dino_train.runtime.progress import use_progress_bar

FeatureFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


class NonFiniteFeaturesError(CheckpointError):
    """A backbone gave NaN or inf features: an accuracy computed on them would mean nothing. A
    CheckpointError because the weights are the usual cause, so the tools report it as bad input."""


def cls_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The default feature: ``model(images)``, for our backbones the final-norm CLS token (B, D)."""
    return model(images)


def _gather_shards(local: torch.Tensor, world: int, device: torch.device) -> list[torch.Tensor]:
    """All-gather (n_r, *S) tensors of different lengths n_r: pad to the longest, gather, trim."""
    # NCCL only moves CUDA tensors; gloo moves CPU ones.
    comm_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    n = torch.tensor([local.shape[0]], device=comm_device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=comm_device)
    padded[: local.shape[0]] = local.to(comm_device)
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return [o[: int(s.item())].cpu() for o, s in zip(out, sizes, strict=True)]


def _feature_dim(local_dim: int, device: torch.device) -> int:
    """Every rank learns D even if its own shard was empty (more processes than images)."""
    comm_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    d = torch.tensor([local_dim], device=comm_device)
    dist.all_reduce(d, op=dist.ReduceOp.MAX)
    return int(d.item())


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    device: torch.device | str,
    progress: bool = True,
    fn: FeatureFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed every image of ``dataset`` (items ``(image (3, H, W), label)``) with ``fn(model, batch)``.

    Returns feats (N, D) float32 and labels (N,) int64, both on the CPU in data set order, on every rank.
    The model runs in eval mode and gets its previous mode back afterwards (training's periodic k-NN
    calls this mid-run); ``fn`` defaults to :func:`cls_features`. ``progress``: a bar on rank 0, drawn
    only where ``use_progress_bar`` allows (a terminal, outside Slurm). Features that are not finite
    raise :class:`NonFiniteFeaturesError` on every rank (checked after the gather, so all ranks agree).
    """
    device = torch.device(device)
    fn = cls_features if fn is None else fn
    was_training = model.training
    model.eval()
    try:
        feats, labels = _extract(model, dataset, batch_size, num_workers, device, progress, fn)
    finally:
        model.train(was_training)
    check_finite(feats, model)
    return feats, labels


def check_finite(feats: torch.Tensor, model: nn.Module) -> None:
    """Raise NonFiniteFeaturesError naming the model's checkpoint (``model.load_info``, set by
    ``dino_train.models.loading.load_backbone``) when any row of ``feats`` (N, D) holds a NaN or an inf."""
    bad = ~torch.isfinite(feats.reshape(len(feats), -1)).all(dim=1)
    n_bad = int(bad.sum())
    if not n_bad:
        return
    info = getattr(model, "load_info", None) or {}
    who = f"the backbone from {info['path']}" if info.get("path") else f"the {type(model).__name__} model"
    if info.get("checkpoint_key"):
        who += f" [{info['checkpoint_key']}]"
    first = int(bad.nonzero()[0, 0])
    raise NonFiniteFeaturesError(
        f"{who} gives NaN or inf features for {n_bad} of {len(feats)} images (first: image {first}); "
        "refusing to evaluate them. Its weights may hold NaN/inf (loading warns), or the precision overflows"
    )


def _extract(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    progress: bool,
    fn: FeatureFn,
) -> tuple[torch.Tensor, torch.Tensor]:
    rank, world = (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
    shard = list(range(rank, len(dataset), world))
    loader = DataLoader(
        Subset(dataset, shard),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
    )
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    draw = progress and rank == 0 and use_progress_bar()
    bar = tqdm(loader, desc="features", unit="batch", disable=not draw, dynamic_ncols=True)
    for batch in bar:
        images, target = _split_batch(batch)
        out = fn(model, images.to(device, non_blocking=True))
        feats.append(out.float().reshape(out.shape[0], -1).cpu())
        labels.append(torch.as_tensor(target).long().cpu())
    dim = feats[0].shape[1] if feats else 0
    if world > 1:
        dim = _feature_dim(dim, device)
    local_feats = torch.cat(feats) if feats else torch.zeros(0, dim)
    local_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    if world == 1:
        return local_feats, local_labels

    all_feats = torch.empty(len(dataset), dim)
    all_labels = torch.empty(len(dataset), dtype=torch.long)
    for r, (f, lab) in enumerate(
        zip(
            _gather_shards(local_feats, world, device),
            _gather_shards(local_labels, world, device),
            strict=True,
        )
    ):
        # Rank r embedded images r, r + world, ...: put them back in their places.
        all_feats[r::world] = f
        all_labels[r::world] = lab
    return all_feats, all_labels


def _split_batch(batch: Any) -> tuple[torch.Tensor, Any]:
    if isinstance(batch, list | tuple) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError("the data set must yield (image, label) pairs")
