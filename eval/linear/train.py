"""The linear-probe loop: batches of token stacks in, SGD steps on every classifier of the grid out.

Works the same in one process and under torchrun: each rank trains on its shard and the classifiers'
gradients are averaged over ranks before every step (they are tiny, so one flat all-reduce is cheap and
keeps every rank's classifiers identical without DDP's bucketing machinery).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms
from tqdm import tqdm

from dino_train.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dino_train.runtime.distributed import all_reduce_sum
from dino_train.runtime.progress import use_progress_bar
from eval.linear.model import (
    GridPoint,
    LinearGrid,
    backbone_tokens,
    feature_stats,
    lr_for,
    topk_correct,
)

Batch = tuple[torch.Tensor, torch.Tensor]  # token stack (B, n_max + 1, D), labels (B,)


def cached_batches(
    tokens: torch.Tensor, labels: torch.Tensor, batch_size: int, epoch: int, seed: int, rank: int, world: int
) -> Iterator[Batch]:
    """Shuffled batches of precomputed token stacks; this rank's share of a per-epoch permutation.

    The permutation is padded (wrapping around) to a multiple of ``world`` so every rank runs the same
    number of steps, as DistributedSampler does: a rank with one step fewer would hang the all-reduce.
    """
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(len(labels), generator=g)
    total = -(-len(perm) // world) * world
    perm = torch.cat([perm, perm[: total - len(perm)]])[rank::world]
    for start in range(0, len(perm), batch_size):
        idx = perm[start : start + batch_size]
        yield tokens[idx], labels[idx]


def image_loader(
    dataset: Dataset, batch_size: int, num_workers: int, seed: int, rank: int, world: int, cuda: bool
) -> DataLoader:
    """Augmented images, shuffled per epoch (call ``loader.sampler.set_epoch``) and sharded over ranks."""
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=cuda,
        drop_last=False,
        persistent_workers=num_workers > 0,
    )


def image_batches(
    loader: DataLoader, backbone: nn.Module, n_max: int, device: torch.device
) -> Iterator[Batch]:
    """Run the frozen backbone once per batch; every classifier shares the resulting token stack."""
    for images, labels in loader:
        with torch.no_grad():
            tokens = backbone_tokens(backbone, images.to(device, non_blocking=True), n_max)
        yield tokens.float(), labels


def _average_gradients(params: list[nn.Parameter], world: int) -> None:
    if world == 1:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    all_reduce_sum(flat)
    flat /= world
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def probe_optimizer(
    grid: LinearGrid, total_batch: int, epochs: int
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.CosineAnnealingLR]:
    """The release's probe optimiser: SGD with momentum 0.9 and no weight decay, each classifier at its
    grid point's lr scaled by ``total_batch`` / 256, cosine to 0 over ``epochs`` (stepped per epoch)."""
    optimizer = torch.optim.SGD(
        [
            {"params": h.parameters(), "lr": lr_for(p, total_batch)}
            for p, h in zip(grid.points, grid.heads, strict=True)
        ],
        lr=lr_for(grid.points[0], total_batch),
        momentum=0.9,
        weight_decay=0.0,
    )
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=0.0)


def train_one_epoch(
    grid: LinearGrid,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Batch],
    device: torch.device,
    world: int,
    progress: bool = False,
    total: int | None = None,
) -> float:
    """One pass of SGD steps on every classifier; returns the mean (over steps and classifiers) loss."""
    grid.train()
    params = [p for p in grid.parameters()]
    loss_sum, steps = 0.0, 0
    draw = progress and use_progress_bar()  # never \r frames in a file or a Slurm log
    for tokens, labels in tqdm(batches, total=total, disable=not draw, desc="linear", unit="batch"):
        tokens, labels = tokens.to(device), labels.to(device)
        # Summing the per-classifier losses trains each classifier exactly as if it were alone: their
        # parameters are disjoint, so each gradient only sees its own loss.
        losses = [F.cross_entropy(logits, labels) for logits in grid(tokens)]
        optimizer.zero_grad(set_to_none=False)
        torch.stack(losses).sum().backward()
        _average_gradients(params, world)
        optimizer.step()
        loss_sum += float(torch.stack(losses).detach().mean())
        steps += 1
    return loss_sum / max(steps, 1)


@torch.no_grad()
def validate(
    grid: LinearGrid, tokens: torch.Tensor, labels: torch.Tensor, device: torch.device
) -> list[dict]:
    """Top-1 / top-5 (percent) of every classifier on precomputed val token stacks (M, n_max + 1, D).

    Every rank holds all val tokens, so this needs no communication and all ranks agree.
    """
    grid.eval()
    hits = torch.zeros(len(grid.points), 2, dtype=torch.long)
    for start in range(0, len(labels), 1024):
        t = tokens[start : start + 1024].to(device)
        y = labels[start : start + 1024].to(device)
        for i, logits in enumerate(grid(t)):
            hits[i] += torch.tensor(topk_correct(logits, y))
    m = max(len(labels), 1)
    return [{"top1": 100.0 * int(h[0]) / m, "top5": 100.0 * int(h[1]) / m} for h in hits]


class Tracker:
    """Per-classifier accuracy history, the best epoch of each, and its weights at that epoch. Epochs are
    named by their 0-based index, as the training log names them (checkpoints count epochs completed)."""

    def __init__(self, n: int):
        self.history: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        self.best_states: list[dict[str, torch.Tensor] | None] = [None] * n

    def update(self, epoch: int, accs: list[dict], grid: LinearGrid) -> None:
        for i, acc in enumerate(accs):
            best = self.best(i)
            self.history[i].append({"epoch": epoch, **acc})
            if best is None or acc["top1"] > best["top1"]:
                self.best_states[i] = grid.head_state(i)  # on raw features: saved as is

    def best(self, i: int) -> dict[str, Any] | None:
        """The first epoch with the highest top-1 (ties keep the earlier epoch)."""
        h = self.history[i]
        return max(h, key=lambda r: (r["top1"], -r["epoch"])) if h else None

    def last(self, i: int) -> dict[str, Any] | None:
        return self.history[i][-1] if self.history[i] else None

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "best_states": self.best_states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = state["history"]
        self.best_states = state["best_states"]


def train_transform(crop: int) -> transforms.Compose:
    """The release's probe augmentation: RandomResizedCrop (default scale, bilinear) and a flip."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(crop),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


_ADDED_SETTINGS = {"standardize": False}


def resume_probes(
    path: Path,
    settings: dict[str, Any],
    grid: LinearGrid,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    tracker: Tracker,
    disabled: bool,
) -> int:
    """Restore the probes from an earlier run of the same settings; returns the epochs already done."""
    if disabled or not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    # A setting added later is absent from older checkpoints, which ran with its default.
    differs = [k for k in settings if state.get(k, _ADDED_SETTINGS.get(k)) != settings[k]]
    if differs:
        raise SystemExit(
            f"error: {path} is from a run with different {', '.join(differs)}; "
            "use another --output-dir or pass --no-resume"
        )
    grid.load_state_dict(state["grid"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    tracker.load_state_dict(state["tracker"])
    return int(state["epoch"])


def train_probe_in_memory(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    epochs: int = 100,
    lr: float = 0.001,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
    standardize: bool = False,
) -> tuple[nn.Linear, Tracker]:
    """One linear probe on features already in memory, by ``eval_linear --cached-features``'s recipe
    (with ``standardize``, ``--standardize``'s: see :func:`eval.linear.model.feature_stats`).

    train_feats (N, D), val_feats (M, D): one feature vector per image (e.g. the CLS token);
    train_labels (N,), val_labels (M,): int64 in [0, num_classes). ``lr`` is for a batch of 256 (scaled by
    ``batch_size`` / 256). With the same seed, lr, batch and epochs, the probe is the one
    ``eval_linear --cached-features --n-last-blocks 1 --avgpool no`` trains in one process.
    Returns the last epoch's classifier Linear(D, num_classes) on the CPU, taking raw features (any
    standardisation folded in), and the tracker holding the val top-1/top-5 (percent) of every epoch.
    """
    if train_feats.ndim != 2 or val_feats.ndim != 2 or train_feats.shape[1] != val_feats.shape[1]:
        raise ValueError(
            f"need train (N, D) and val (M, D) features; got {tuple(train_feats.shape)}, "
            f"{tuple(val_feats.shape)}"
        )
    if len(train_feats) != len(train_labels) or len(val_feats) != len(val_labels):
        raise ValueError("features and labels disagree on the number of images")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"need epochs >= 1 and batch_size >= 1; got {epochs=}, {batch_size=}")
    device = torch.device(device)
    # A (N, D) feature is a token stack of one block plus an unused avgpool slot; expand is a view, so
    # the bank is not copied.
    train_tokens = train_feats.detach().float().cpu().unsqueeze(1).expand(-1, 2, -1)
    val_tokens = val_feats.detach().float().cpu().unsqueeze(1).expand(-1, 2, -1)
    train_labels, val_labels = train_labels.long().cpu(), val_labels.long().cpu()
    with torch.random.fork_rng(devices=[]):  # seed the init as eval_linear does, leaving the caller's RNG
        torch.manual_seed(seed)
        stats = feature_stats(train_tokens) if standardize else None
        grid = LinearGrid([GridPoint(lr, 1, False)], train_feats.shape[1], num_classes, stats)
    grid.to(device)
    optimizer, scheduler = probe_optimizer(grid, batch_size, epochs)
    tracker = Tracker(1)
    for epoch in range(epochs):
        batches = cached_batches(train_tokens, train_labels, batch_size, epoch, seed, 0, 1)
        train_one_epoch(grid, optimizer, batches, device, 1, progress)
        scheduler.step()
        tracker.update(epoch, validate(grid, val_tokens, val_labels, device), grid)
    head = nn.utils.skip_init(nn.Linear, train_feats.shape[1], num_classes)  # no init: the RNG stays put
    head.load_state_dict(grid.head_state(0))
    return head, tracker
