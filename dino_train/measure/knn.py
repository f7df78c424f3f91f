"""Weighted k-NN classification on frozen features, with faiss for the neighbour search.

The rule is the original release's (``eval_knn.py``): cosine similarity between L2-normalised features, the
k nearest training images vote for their label with weight ``exp(sim / T)``, T = 0.07. Unlike the release,
the search runs in faiss (exact ``IndexFlatIP``, so the neighbours are the same), the class count comes from
the caller, and any number of test images works (the release crashes below 100).

Pure: tensors in, tensors and floats out; no config, environment or process group.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from dino_train.measure.settings import KNN_KS, KNN_TEMPERATURE

# faiss's GPU brute-force search has a hard limit on k (faiss issues #1384, #2103).
FAISS_GPU_MAX_K = 2048


def faiss_has_gpu() -> bool:
    """True when this faiss build has GPU support and torch sees a CUDA device."""
    return hasattr(faiss, "StandardGpuResources") and torch.cuda.is_available()


def _as_faiss_array(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())


def faiss_topk(
    train: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    use_gpu: bool | None = None,
    chunk_size: int = 8192,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest inner products of each query with the rows of ``train``, exact.

    train: (N, D) float32, L2-normalised rows (so inner product = cosine similarity); queries: (M, D).
    Returns sims (M, k') float32 in decreasing order and idx (M, k') int64 row indices into ``train``,
    on the CPU, where k' = k capped at N (and at 2048 on a GPU index), with a warning when capped.
    ``use_gpu``: None picks a GPU index when faiss has GPU support and CUDA is available.
    Queries are searched ``chunk_size`` rows at a time to bound faiss's temporary memory.
    """
    if train.ndim != 2 or queries.ndim != 2 or train.shape[1] != queries.shape[1]:
        raise ValueError(
            f"need train (N, D) and queries (M, D); got {tuple(train.shape)}, {tuple(queries.shape)}"
        )
    n, dim = train.shape
    if n == 0:
        raise ValueError("the training bank is empty: no neighbours to search")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    gpu = faiss_has_gpu() if use_gpu is None else use_gpu
    if gpu and not faiss_has_gpu():
        raise RuntimeError(
            "use_gpu=True but this faiss build has no GPU support or torch sees no CUDA device; "
            "install faiss-gpu-cu12 (pip install 'dino-train[gpu]') or pass use_gpu=False"
        )
    if k > n:
        warnings.warn(f"k={k} is more than the {n} training features; using k={n}", stacklevel=2)
        k = n
    if gpu and k > FAISS_GPU_MAX_K:
        warnings.warn(
            f"k={k} is above faiss-GPU's limit of {FAISS_GPU_MAX_K}; using k={FAISS_GPU_MAX_K} "
            "(pass use_gpu=False for larger k)",
            stacklevel=2,
        )
        k = FAISS_GPU_MAX_K

    index = faiss.IndexFlatIP(dim)
    if gpu:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, torch.cuda.current_device(), index)
    index.add(_as_faiss_array(train))

    m = queries.shape[0]
    sims = np.empty((m, k), dtype=np.float32)
    idx = np.empty((m, k), dtype=np.int64)
    for start in range(0, m, chunk_size):
        stop = min(start + chunk_size, m)
        sims[start:stop], idx[start:stop] = index.search(_as_faiss_array(queries[start:stop]), k)
    return torch.from_numpy(sims), torch.from_numpy(idx)


def knn_vote(
    sims: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, temperature: float = KNN_TEMPERATURE
) -> torch.Tensor:
    """Class scores (M, num_classes): score[c] = sum over neighbours j with label c of exp(sims[j] / T).

    sims: (M, k) cosine similarities; neighbour_labels: (M, k) int64 in [0, num_classes).
    """
    if sims.shape != neighbour_labels.shape:
        raise ValueError(f"sims {tuple(sims.shape)} and labels {tuple(neighbour_labels.shape)} differ")
    weights = (sims.float() / temperature).exp()
    scores = torch.zeros(sims.shape[0], num_classes, dtype=torch.float32, device=sims.device)
    # scatter_add over the label index is the release's one-hot product without the (M, k, C) tensor.
    return scores.scatter_add_(1, neighbour_labels.long(), weights)


def _topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, maxk: int) -> tuple[float, float]:
    """Top-1 and top-``maxk`` accuracy in percent of scores (M, C) against labels (M,)."""
    pred = scores.topk(maxk, dim=1).indices  # (M, maxk), best first
    hits = pred.eq(labels.view(-1, 1))
    m = labels.numel()
    return 100.0 * hits[:, :1].sum().item() / m, 100.0 * hits.sum().item() / m


def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    use_gpu: bool | None = None,
) -> dict[int, tuple[float, float]]:
    """Weighted k-NN accuracy: {k: (top-1 %, top-5 %)} for each requested k.

    train_feats (N, D), test_feats (M, D): normalised here (cosine similarity, as the release);
    train_labels (N,), test_labels (M,): int64 in [0, num_classes). One faiss search with the largest k,
    then each k uses its first k neighbours. A k above N is capped at N with a warning (the result stays
    keyed by the requested k). With fewer than 5 classes, "top-5" is top-num_classes (always 100%).
    """
    if not ks:
        raise ValueError("ks is empty: give at least one k")
    if train_feats.shape[0] != train_labels.shape[0] or test_feats.shape[0] != test_labels.shape[0]:
        raise ValueError("features and labels disagree on the number of images")
    if test_feats.shape[0] == 0:
        raise ValueError("no test features to classify")
    n = train_feats.shape[0]
    too_big = sorted(k for k in ks if k > n)
    if too_big:
        warnings.warn(f"k={too_big} exceed the {n} training images; those use k={n}", stacklevel=2)
    kmax = min(max(ks), n)
    train_n = F.normalize(train_feats.float(), dim=1)
    test_n = F.normalize(test_feats.float(), dim=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the cap was reported above, once
        sims, idx = faiss_topk(train_n, test_n, kmax, use_gpu=use_gpu)
    kmax = sims.shape[1]  # a GPU index may have capped it further
    neighbour_labels = train_labels.cpu().long()[idx]  # (M, kmax)
    test_labels = test_labels.cpu().long()
    maxk = min(5, num_classes)
    results: dict[int, tuple[float, float]] = {}
    for k in ks:
        kk = min(k, kmax)
        scores = knn_vote(sims[:, :kk], neighbour_labels[:, :kk], num_classes, temperature)
        results[k] = _topk_accuracy(scores, test_labels, maxk)
    return results


def knn_scores(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    k: int,
    num_classes: int,
    temperature: float = KNN_TEMPERATURE,
    use_gpu: bool | None = None,
) -> torch.Tensor:
    """Class scores (M, num_classes) of the weighted vote of each test feature's k nearest training
    features (cosine similarity, as ``knn_classify``); k above N is capped at N with a warning."""
    sims, idx = faiss_topk(
        F.normalize(train_feats.float(), dim=1), F.normalize(test_feats.float(), dim=1), k, use_gpu
    )
    return knn_vote(sims, train_labels.cpu().long()[idx], num_classes, temperature)
