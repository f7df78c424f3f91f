"""Linear-probe features and classifiers: one frozen backbone pass feeds a grid of linear classifiers.

A backbone pass yields a token stack (B, n_max + 1, D): the final-norm CLS tokens of the last ``n_max``
blocks, then the mean of the last block's final-norm patch tokens. Each grid point (lr, n, avgpool) reads
its features from that stack, so training every point costs one backbone pass per batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dino_train.runtime.files import CheckpointError, atomic_save, strip_prefix


@dataclass(frozen=True)
class GridPoint:
    """One classifier: base lr (for a total batch of 256), CLS tokens of the last n blocks, avgpool."""

    lr: float
    n_last_blocks: int
    avgpool: bool

    @property
    def name(self) -> str:
        return f"lr{self.lr:g}_n{self.n_last_blocks}{'_avgpool' if self.avgpool else ''}"


def default_variant(embed_dim: int) -> tuple[int, bool]:
    """The release's README settings: ViT-B n=1 with avgpool; ViT-S and smaller n=4 without."""
    return (1, True) if embed_dim >= 768 else (4, False)


def backbone_tokens(model: nn.Module, images: torch.Tensor, n_max: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, n_max + 1, D): CLS of each of the last n_max blocks, then avg-pooled patches.

    Models without ``get_intermediate_layers`` (non-ViT timm models) give (B, 2, D): ``model(images)``
    as the one "block", and a zero avgpool slot (callers allow only n=1 without avgpool for them).
    """
    if not hasattr(model, "get_intermediate_layers"):
        feats = model(images)
        return torch.stack([feats, torch.zeros_like(feats)], dim=1)
    layers = model.get_intermediate_layers(images, n_max, return_prefix_tokens=True, norm=True)
    cls = [prefix[:, 0] for _, prefix in layers]  # prefix tokens (B, P, D): CLS first, then registers
    avg = layers[-1][0].mean(dim=1)
    return torch.stack([*cls, avg], dim=1)


def max_blocks(model: nn.Module) -> int:
    """How many last blocks' CLS tokens the model can give (1 for a model without blocks)."""
    return len(model.blocks) if hasattr(model, "get_intermediate_layers") else 1


def variant_features(tokens: torch.Tensor, n: int, avgpool: bool) -> torch.Tensor:
    """Token stack (B, n_max + 1, D) -> features (B, (n + avgpool) * D).

    The last n CLS tokens are concatenated oldest first. With avgpool the last block's CLS and its mean
    patch token are interleaved element by element: the release's layout for n=1, so its ViT-B linear
    weights apply unchanged (the release crashes for n > 1; here earlier CLS tokens come first).
    """
    n_max = tokens.shape[1] - 1
    if n > n_max:
        raise ValueError(f"n_last_blocks={n} but the token stack holds {n_max} blocks")
    cls = tokens[:, n_max - n : n_max]  # (B, n, D)
    if not avgpool:
        return cls.flatten(1)
    last = torch.stack([cls[:, -1], tokens[:, n_max]], dim=-1).flatten(1)  # (B, 2D) interleaved
    return torch.cat([cls[:, :-1].flatten(1), last], dim=1)


def new_linear(in_dim: int, num_classes: int) -> nn.Linear:
    """The release's probe: weight ~ N(0, 0.01), bias 0."""
    layer = nn.Linear(in_dim, num_classes)
    nn.init.normal_(layer.weight, std=0.01)
    nn.init.zeros_(layer.bias)
    return layer


def feature_stats(train: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std (+ ``eps``) of training features over their first dim: (N, ...) ->
    two (...) tensors. The standardisation ``(x - mean) / std`` of the probes (``--standardize``, the
    scorecard): the concatenated blocks' CLS tokens differ in scale by orders of magnitude between
    dimensions and one learning rate cannot suit them all; a fixed affine map of the inputs keeps the
    classifier linear in the features (it folds into the weights) but conditions its training (MAE's probe
    puts a BatchNorm without affine parameters before the classifier for the same reason)."""
    return train.mean(0), train.std(0) + eps


class LinearGrid(nn.Module):
    """One linear classifier per grid point; forward maps a token stack to a list of logits (B, C).

    With ``stats`` (the shift and scale of each token slot, (n_max + 1, D), from :func:`feature_stats` of
    the training token stacks) the classifiers see standardised tokens; :meth:`head_state` folds that map
    into each classifier's weights, so every saved probe is a plain Linear on the raw features."""

    def __init__(
        self,
        points: list[GridPoint],
        embed_dim: int,
        num_classes: int,
        stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        super().__init__()
        self.points = list(points)
        self.heads = nn.ModuleList(
            new_linear((p.n_last_blocks + p.avgpool) * embed_dim, num_classes) for p in self.points
        )
        self.shift: torch.Tensor | None
        self.scale: torch.Tensor | None
        self.register_buffer("shift", None)  # None buffers stay out of the state dict
        self.register_buffer("scale", None)
        if stats is not None:
            shift, scale = stats
            if shift.shape != (self.n_max + 1, embed_dim) or scale.shape != shift.shape:
                raise ValueError(
                    f"stats must be two ({self.n_max + 1}, {embed_dim}) tensors (one row per token slot); "
                    f"got {tuple(shift.shape)}, {tuple(scale.shape)}"
                )
            self.register_buffer("shift", shift.detach().float().clone())
            self.register_buffer("scale", scale.detach().float().clone())

    @property
    def n_max(self) -> int:
        return max(p.n_last_blocks for p in self.points)

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        if self.shift is not None:
            tokens = (tokens - self.shift) / self.scale
        return [
            head(variant_features(tokens, p.n_last_blocks, p.avgpool))
            for p, head in zip(self.points, self.heads, strict=True)
        ]

    def head_state(self, i: int) -> dict[str, torch.Tensor]:
        """Classifier ``i`` as the state of a Linear on raw (unstandardised) features, on the CPU:
        W (x - m) / s + b = (W / s) x + (b - W (m / s))."""
        head, p = self.heads[i], self.points[i]
        weight, bias = head.weight.detach().cpu(), head.bias.detach().cpu()
        if self.shift is None:
            return {"weight": weight.clone(), "bias": bias.clone()}
        m = variant_features(self.shift.cpu()[None], p.n_last_blocks, p.avgpool)[0]
        s = variant_features(self.scale.cpu()[None], p.n_last_blocks, p.avgpool)[0]
        return {"weight": weight / s, "bias": bias - weight @ (m / s)}


def topk_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """Counts of top-1 and top-5 hits (top-C when fewer than 5 classes)."""
    pred = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = pred.eq(labels.view(-1, 1))
    return int(hits[:, :1].sum()), int(hits.sum())


def save_classifier(path: Path, head: nn.Linear, point: GridPoint, classes: list[str], **extra: Any) -> None:
    """A single probe: ``state_dict`` keyed ``linear.*`` like the release's ``*_linearweights.pth``,
    plus what is needed to rebuild its features."""
    state = {
        "state_dict": {f"linear.{k}": v.detach().cpu() for k, v in head.state_dict().items()},
        "n_last_blocks": point.n_last_blocks,
        "avgpool_patchtokens": point.avgpool,
        "lr": point.lr,
        "classes": list(classes),
        **extra,
    }
    atomic_save(state, path)


def load_classifier(path: str | Path) -> tuple[nn.Linear, dict[str, Any]]:
    """Read a probe saved by :func:`save_classifier`, the release's ``state_dict`` with
    ``module.linear.*`` keys, or a plain {weight, bias}. Returns the layer and the file's settings
    (``n_last_blocks``, ``avgpool_patchtokens``, ``classes`` where stored)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"classifier file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path} is not a classifier file: {type(err).__name__}: {err}") from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a classifier")
    sd = obj.get("state_dict", obj)
    sd = strip_prefix(strip_prefix(sd, "module."), "linear.")
    if set(sd) != {"weight", "bias"} or sd["weight"].ndim != 2:
        raise CheckpointError(
            f"{path}: expected linear weight and bias, found keys {', '.join(map(str, sd))}"
        )
    out_dim, in_dim = sd["weight"].shape
    layer = nn.Linear(in_dim, out_dim)
    layer.load_state_dict(sd)
    meta = {k: obj[k] for k in ("n_last_blocks", "avgpool_patchtokens", "classes") if k in obj}
    return layer, meta


def lr_for(point: GridPoint, total_batch: int) -> float:
    """The linear scaling rule the release uses for the probe: lr * total batch / 256."""
    return point.lr * total_batch / 256.0
