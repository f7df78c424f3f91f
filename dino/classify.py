"""Classify features held in memory: weighted k-NN (``dino_train.measure.knn``, as ``eval_knn``) and a
linear probe (``eval.linear.train``, as ``eval_linear --cached-features``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dino_train.measure.knn import knn_classify, knn_scores
from dino_train.measure.settings import KNN_TEMPERATURE
from eval.linear.train import train_probe_in_memory

ArrayLike = Tensor | np.ndarray | Sequence[Any]


def _features(x: ArrayLike, name: str) -> Tensor:
    t = torch.as_tensor(x).detach().float().cpu()
    if t.ndim != 2:
        raise ValueError(f"{name} must be (N, D); got shape {tuple(t.shape)}")
    return t


def _labels(y: ArrayLike, n: int, name: str) -> Tensor:
    t = torch.as_tensor(y).detach().long().cpu()
    if t.shape != (n,):
        raise ValueError(f"{name} must be ({n},), one label per feature row; got shape {tuple(t.shape)}")
    if n and int(t.min()) < 0:
        raise ValueError(f"{name} holds negative labels (-1 marks unlabelled images): k-NN needs classes")
    return t


def _num_classes(num_classes: int | None, *labels: Tensor) -> int:
    return num_classes if num_classes is not None else 1 + max(int(y.max()) for y in labels if y.numel())


def knn_predict(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    k: int = 20,
    temperature: float = KNN_TEMPERATURE,
    num_classes: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Weighted k-NN labels of ``test_features`` (M, D) given ``train_features`` (N, D) and their labels (N,).

    The release's rule: cosine similarity, the k nearest training features vote for their label with
    weight exp(similarity / temperature). Returns predictions (M,) int64 and class scores (M, C) float32;
    C = ``num_classes`` (default: the largest train label + 1). k above N is capped at N with a warning.
    """
    train = _features(train_features, "train_features")
    test = _features(test_features, "test_features")
    labels = _labels(train_labels, len(train), "train_labels")
    c = _num_classes(num_classes, labels)
    scores = knn_scores(train, labels, test, k, c, temperature)
    # topk, not argmax, so ties break as in knn_classify's accuracy.
    return scores.topk(1, dim=1).indices[:, 0], scores


def knn_accuracy(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    test_labels: ArrayLike,
    k: int = 20,
    temperature: float = KNN_TEMPERATURE,
    num_classes: int | None = None,
) -> float:
    """Top-1 accuracy in percent of :func:`knn_predict` against ``test_labels`` (M,), as ``eval_knn``."""
    train = _features(train_features, "train_features")
    test = _features(test_features, "test_features")
    y_train = _labels(train_labels, len(train), "train_labels")
    y_test = _labels(test_labels, len(test), "test_labels")
    c = _num_classes(num_classes, y_train, y_test)
    return knn_classify(train, y_train, test, y_test, c, ks=(k,), temperature=temperature)[k][0]


@dataclass
class LinearProbe:
    """A linear classifier trained on frozen features, and its test accuracy."""

    classifier: nn.Linear  # (D -> C) on the CPU, the last epoch's weights
    accuracy: float  # top-1 percent on the test features after the last epoch
    top5: float  # top-5 percent (top-C with fewer than 5 classes)
    history: list[dict[str, float]]  # per epoch: {"epoch" (0-based), "top1", "top5"} on the test features

    def __repr__(self) -> str:
        # Short: the per-epoch history (100 dicts by default) is in .history, the weights in .classifier.
        c = self.classifier
        return (
            f"LinearProbe(classifier=Linear({c.in_features} -> {c.out_features}), "
            f"accuracy={self.accuracy:.2f}, top5={self.top5:.2f}, epochs={len(self.history)})"
        )

    @torch.no_grad()
    def predict(self, features: ArrayLike) -> Tensor:
        """Labels (N,) int64 of features (N, D)."""
        return self.classifier(_features(features, "features")).argmax(dim=1)


def linear_probe(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    test_labels: ArrayLike,
    epochs: int = 100,
    lr: float = 0.001,
    batch_size: int = 256,
    seed: int = 0,
    num_classes: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    standardize: bool = False,
) -> LinearProbe:
    """Train Linear(D, C) on ``train_features`` (N, D) by the release's recipe and test it each epoch.

    SGD with momentum 0.9 and no weight decay, lr = ``lr`` * ``batch_size`` / 256 decayed by a cosine to 0
    over ``epochs``, weights initialised N(0, 0.01), batches reshuffled every epoch from ``seed``. The
    release's ``lr=0.001`` is tuned for ImageNet's 5000 steps per epoch; on a few hundred features a
    larger lr (0.1 to 1) is needed. The reported accuracy is the last epoch's, not the best over epochs
    (choosing an epoch on the test set would flatter it). The caller's random state is left untouched.
    ``standardize``: train on features standardised by the train split's per-dimension mean and std
    (``eval_linear --standardize``); the returned classifier folds that in and takes raw features.
    """
    train = _features(train_features, "train_features")
    test = _features(test_features, "test_features")
    y_train = _labels(train_labels, len(train), "train_labels")
    y_test = _labels(test_labels, len(test), "test_labels")
    c = _num_classes(num_classes, y_train, y_test)
    head, tracker = train_probe_in_memory(
        train, y_train, test, y_test, c, epochs, lr, batch_size, seed, device, progress, standardize
    )
    last = tracker.last(0)
    return LinearProbe(head, last["top1"], last["top5"], tracker.history[0])
