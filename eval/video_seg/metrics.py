"""The DAVIS measures of video object segmentation: region similarity J and boundary F, per object.

As the DAVIS 2017 evaluation computes them (Pont-Tuset et al. 2017, davis2017-evaluation):

- J: intersection over union of the predicted and true masks, void pixels (label 255) left out; 1 when
  both are empty.
- F: the F-measure of boundary precision and recall. Boundaries are the one-pixel maps of ``seg2bmap``
  (a pixel whose right, lower or lower-right neighbour differs); a boundary pixel matches when the other
  boundary lies within a disk of radius ceil(0.008 x image diagonal) px of it.
- Semi-supervised videos are scored without their first frame (given) and last frame; an object's J (F)
  is its mean over the frames; J&F is the mean of J-mean and F-mean over all objects of all videos.

Pure: numpy arrays in, floats out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

VOID_LABEL = 255
BOUNDARY_TOLERANCE = 0.008  # fraction of the image diagonal


def region_similarity(truth: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None) -> float:
    """J of two (H, W) boolean masks: |truth & pred| / |truth | pred| outside ``void``; 1 if both empty."""
    if truth.shape != pred.shape:
        raise ValueError(f"masks differ in shape: truth {truth.shape}, prediction {pred.shape}")
    keep = np.ones_like(truth, dtype=bool) if void is None else ~void
    union = np.sum((truth | pred) & keep)
    return 1.0 if union == 0 else float(np.sum(truth & pred & keep) / union)


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose right, lower or lower-right neighbour has the other value; on the last
    row (column) only the right (lower) neighbour counts, and the last corner pixel is never set."""
    m = mask.astype(bool)
    east, south, south_east = np.zeros_like(m), np.zeros_like(m), np.zeros_like(m)
    east[:, :-1], south[:-1, :], south_east[:-1, :-1] = m[:, 1:], m[1:, :], m[1:, 1:]
    b = (m ^ east) | (m ^ south) | (m ^ south_east)
    b[-1, :] = m[-1, :] ^ east[-1, :]
    b[:, -1] = m[:, -1] ^ south[:, -1]
    b[-1, -1] = False
    return b


def disk(radius: int) -> np.ndarray:
    """(2r+1, 2r+1) bool: the integer points within ``radius`` of the centre."""
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """(H, W) bool: the pixels within ``radius`` (a disk) of a set pixel of ``mask``."""
    if radius <= 0:
        return mask.astype(bool)
    kernel = torch.from_numpy(disk(radius).astype(np.float32))[None, None]
    x = torch.from_numpy(mask.astype(np.float32))[None, None]
    return (F.conv2d(x, kernel, padding=radius)[0, 0] > 0.5).numpy()


def boundary_f(
    truth: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None, tolerance: float = BOUNDARY_TOLERANCE
) -> float:
    """F of two (H, W) boolean masks' boundaries; ``tolerance`` below 1 is a fraction of the diagonal,
    at least 1 a radius in px. No boundary in either: 1; in only one of them: 0."""
    if truth.shape != pred.shape:
        raise ValueError(f"masks differ in shape: truth {truth.shape}, prediction {pred.shape}")
    keep = np.ones_like(truth, dtype=bool) if void is None else ~void
    radius = int(tolerance if tolerance >= 1 else math.ceil(tolerance * math.hypot(*truth.shape)))
    pred_b, truth_b = boundary_map(pred & keep), boundary_map(truth & keep)
    n_pred, n_truth = int(pred_b.sum()), int(truth_b.sum())
    if n_pred == 0 or n_truth == 0:
        return 1.0 if n_pred == n_truth else 0.0
    precision = float((pred_b & dilate(truth_b, radius)).sum()) / n_pred
    recall = float((truth_b & dilate(pred_b, radius)).sum()) / n_truth
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def score_video(
    truth: Sequence[np.ndarray], pred: Sequence[np.ndarray], objects: Sequence[int], skip_ends: bool = True
) -> dict[int, dict[str, float | None]]:
    """Per object id: J and F means over the frames (the first and last left out when ``skip_ends``, as
    DAVIS scores semi-supervised results), J and F recall (fraction of frames above 0.5), frame count.
    ``truth`` and ``pred`` are (H, W) label maps, one per frame; 255 in ``truth`` is void."""
    if len(truth) != len(pred):
        raise ValueError(f"{len(pred)} predicted frames for {len(truth)} annotated ones")
    frames = range(1, len(truth) - 1) if skip_ends else range(len(truth))
    out: dict[int, dict[str, float | None]] = {}
    for obj in objects:
        js, fs = [], []
        for t in frames:
            void = truth[t] == VOID_LABEL
            js.append(region_similarity(truth[t] == obj, pred[t] == obj, void))
            fs.append(boundary_f(truth[t] == obj, pred[t] == obj, void))
        out[obj] = {
            "J": float(np.mean(js)) if js else None,
            "F": float(np.mean(fs)) if fs else None,
            "J_recall": float(np.mean(np.array(js) > 0.5)) if js else None,
            "F_recall": float(np.mean(np.array(fs) > 0.5)) if fs else None,
            "frames": len(js),
        }
    return out


def summarize(per_object: Sequence[dict[str, float | None]]) -> dict[str, float | None]:
    """J-mean, F-mean over the scored objects and J&F-mean = their average: the DAVIS headline (None
    for each when no object was scored, e.g. videos of under three frames)."""
    scored = [o for o in per_object if o["J"] is not None]
    if not scored:
        return {"J&F": None, "J": None, "F": None, "objects": 0}
    j = float(np.mean([o["J"] for o in scored]))
    f = float(np.mean([o["F"] for o in scored]))
    return {"J&F": (j + f) / 2, "J": j, "F": f, "objects": len(scored)}
