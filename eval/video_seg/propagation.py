"""Label propagation by patch-feature affinity: the release's video object segmentation method.

For each new frame, every patch looks up the patches of the context frames (the first frame, with its
true mask, and the ``n_last_frames`` previous ones, with their propagated soft masks), keeps those within
``radius`` patches of its own position (a square window), takes the ``topk`` most similar by cosine
similarity of the final-norm patch tokens, and averages their labels weighted by
``exp(similarity / temperature)``, normalised over the top k. Release values: 7 previous frames, top 5,
radius 12, temperature 0.1. Unlike the release, the affinity is built ``chunk`` target patches at a time,
so memory stays bounded on wide videos (its issue #98), and ties at the k-th value keep exactly k.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from dino_train.models.backbone import as_vit


@dataclass(frozen=True)
class PropagationSettings:
    """The method's knobs, the release's values by default."""

    n_last_frames: int = 7
    topk: int = 5
    radius: int = 12  # size_mask_neighborhood, in patches; 0 or less: no restriction
    temperature: float = 0.1
    chunk: int = 1024  # target patches per affinity block: (chunk, C, N) floats at a time, not the results


def patch_features(model: nn.Module, frame: Tensor) -> Tensor:
    """(1, 3, H, W) normalised frame, H and W multiples of the patch size -> (H/p, W/p, D) final-norm
    patch tokens of the ViT."""
    vit = as_vit(model, "video segmentation (patch tokens)")
    p = int(vit.patch_embed.patch_size[0])
    tokens = vit.forward_features(frame)[0, int(getattr(vit, "num_prefix_tokens", 1)) :]
    return tokens.reshape(frame.shape[-2] // p, frame.shape[-1] // p, -1)


def neighbourhood(h: int, w: int, radius: int) -> Tensor:
    """(h*w, h*w) bool: target patch i may take labels from source patch j when both their row and their
    column differ by at most ``radius``."""
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    y, x = y.reshape(-1), x.reshape(-1)
    return ((y[:, None] - y[None, :]).abs() <= radius) & ((x[:, None] - x[None, :]).abs() <= radius)


def propagate(
    target: Tensor, sources: Tensor, labels: Tensor, settings: PropagationSettings, allowed: Tensor | None
) -> Tensor:
    """Soft labels (K, N) of the N target patches.

    target: (N, D) and sources: (C, N, D), both L2-normalised along D; labels: (C, K, N) the sources'
    soft labels; allowed: (N, N) bool (target, source position) or None for no spatial restriction.
    """
    c, n, _ = sources.shape
    k = labels.shape[1]
    flat_labels = labels.permute(1, 0, 2).reshape(k, c * n)  # (K, C*N): context-major like the sims
    topk = min(settings.topk, c * n)
    out = torch.empty(k, target.shape[0], dtype=labels.dtype, device=labels.device)
    for start in range(0, target.shape[0], settings.chunk):
        stop = min(start + settings.chunk, target.shape[0])
        sim = torch.einsum("td,cnd->tcn", target[start:stop], sources)  # (t, C, N)
        if allowed is not None:
            sim = sim.masked_fill(~allowed[start:stop, None, :], float("-inf"))
        values, index = sim.reshape(stop - start, c * n).topk(topk, dim=1)
        weights = torch.softmax(values / settings.temperature, dim=1)  # exp(s/T) over the top k
        out[:, start:stop] = (flat_labels[:, index] * weights).sum(dim=-1)
    return out


class LabelPropagator:
    """Propagates the first frame's labels through a video, one frame of patch features at a time."""

    def __init__(self, first_features: Tensor, first_labels: Tensor, settings: PropagationSettings):
        """first_features: (h, w, D) patch features; first_labels: (K, h, w) one-hot (or soft) labels."""
        h, w, _ = first_features.shape
        if first_labels.shape[1:] != (h, w):
            raise ValueError(f"labels {tuple(first_labels.shape)} do not fit the {h}x{w} patch grid")
        self.settings, self.grid = settings, (h, w)
        self.first = (
            self._flat(first_features),
            first_labels.reshape(first_labels.shape[0], -1).float().to(first_features.device),
        )
        self.recent: deque[tuple[Tensor, Tensor]] = deque(maxlen=settings.n_last_frames)
        allowed = neighbourhood(h, w, settings.radius) if settings.radius > 0 else None
        self.allowed = allowed.to(first_features.device) if allowed is not None else None

    @staticmethod
    def _flat(features: Tensor) -> Tensor:
        return F.normalize(features.reshape(-1, features.shape[-1]).float(), dim=1)

    def step(self, features: Tensor) -> Tensor:
        """(h, w, D) features of the next frame -> its soft labels (K, h, w); remembered for the next."""
        if tuple(features.shape[:2]) != self.grid:
            raise ValueError(f"frame grid {tuple(features.shape[:2])} differs from the first's {self.grid}")
        target = self._flat(features)
        context = [self.first, *self.recent] if self.settings.n_last_frames > 0 else [self.first]
        sources = torch.stack([f for f, _ in context])
        labels = torch.stack([lab for _, lab in context])
        soft = propagate(target, sources, labels, self.settings, self.allowed)
        self.recent.append((target, soft))
        return soft.reshape(-1, *self.grid)


def one_hot(labels: np.ndarray, num_classes: int) -> Tensor:
    """(h, w) integer labels -> (num_classes, h, w) float one-hot."""
    idx = torch.from_numpy(labels.astype(np.int64))
    return F.one_hot(idx, num_classes).permute(2, 0, 1).float()


def to_label_map(soft: Tensor, patch: int, size: tuple[int, int]) -> np.ndarray:
    """(K, h, w) soft labels -> (H, W) uint8 labels at ``size`` (H, W): bilinear upsampling by the patch
    size, each class map min-max scaled (as the release), argmax, nearest resize to the frame's size."""
    up = F.interpolate(soft[None].float(), scale_factor=patch, mode="bilinear", align_corners=False)[0]
    flat = up.reshape(up.shape[0], -1)
    lo, hi = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    scale = torch.where((hi > 0) & (hi > lo), hi - lo, torch.ones_like(hi))
    shift = torch.where((hi > 0) & (hi > lo), lo, torch.zeros_like(lo))
    labels = ((flat - shift) / scale).argmax(dim=0).reshape(up.shape[1:]).to(torch.uint8).cpu().numpy()
    return np.asarray(Image.fromarray(labels).resize((size[1], size[0]), Image.NEAREST))
