"""Average precision of rankings, with junk images ignored: the retrieval and copy detection measures.

AP is the area under the precision-recall curve by the trapezoid rule of the Holidays evaluation package,
which the revisited Oxford/Paris code (Radenovic et al. 2018, "Revisiting Oxford and Paris") and the
release's copy detection both use: the k-th positive found at 0-based rank r adds
``(k/r + (k+1)/(r+1)) / 2 / num_positives`` (with k/r read as 1 at r = 0). Junk images are removed from
the ranking before the ranks are counted, so they neither help nor hurt. A ranking may be truncated (the
release's copy detection keeps the top 20): positives beyond it add nothing.

Pure: numpy in, floats and dicts out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PRECISION_KS: tuple[int, ...] = (1, 5, 10)  # the release's mP@k
# Revisited Oxford/Paris: which labels count as positives and which as junk in each protocol.
REVISITED_PROTOCOLS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}


@dataclass(frozen=True)
class QueryTruth:
    """One query's ground truth: gallery indices of its positives and of its junk images."""

    positives: np.ndarray
    junk: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def average_precision(ranks: Sequence[int] | np.ndarray, num_positives: int) -> float:
    """AP of one query from the 0-based ranks of the positives it found (junk already removed) and the
    number of positives it has; positives it did not find count as recall never reached."""
    if num_positives <= 0:
        raise ValueError(f"num_positives must be positive, got {num_positives}")
    r = np.sort(np.asarray(ranks, dtype=np.float64))
    found = np.arange(len(r), dtype=np.float64)  # positives before this one
    before = np.divide(found, r, out=np.ones_like(r), where=r > 0)  # precision just before it
    after = (found + 1.0) / (r + 1.0)  # precision including it
    return float(np.sum((before + after) / 2.0) / num_positives)


def positive_ranks(ranking: np.ndarray, truth: QueryTruth) -> np.ndarray:
    """0-based ranks (sorted) of the positives in ``ranking`` (gallery indices, best first) once the junk
    images are taken out of it. An image listed as both positive and junk counts as positive."""
    ranking = np.asarray(ranking)
    is_pos = np.isin(ranking, truth.positives)
    kept = is_pos | ~np.isin(ranking, truth.junk)
    return np.flatnonzero(is_pos[kept])


def precision_at(ranks: np.ndarray, k: int) -> float:
    """The revisited protocol's precision at k: positives within the first k ranks over k, where k is
    capped at the rank of the last positive found (so a query whose positives all come first scores 1)."""
    if len(ranks) == 0:
        return 0.0
    one_based = ranks + 1
    kq = min(int(one_based.max()), k)
    return float((one_based <= kq).sum() / kq)


def mean_average_precision(
    rankings: np.ndarray, truths: Sequence[QueryTruth], ks: Sequence[int] = PRECISION_KS
) -> dict[str, Any]:
    """mAP over queries of ``rankings`` (Q, K) gallery indices (best first; K may be below the gallery
    size) against ``truths`` (Q). Queries without positives are left out (their AP is None), as the
    revisited code does. Returns map, mp_at_k {k: mean precision}, aps (Q, float or None), num_evaluated.
    Values are fractions in [0, 1]; map and mp_at_k are None when no query has a positive."""
    if len(rankings) != len(truths):
        raise ValueError(f"{len(rankings)} rankings for {len(truths)} queries")
    aps: list[float | None] = []
    precisions: list[list[float]] = []
    for ranking, truth in zip(rankings, truths, strict=True):
        if len(truth.positives) == 0:
            aps.append(None)
            continue
        ranks = positive_ranks(ranking, truth)
        aps.append(average_precision(ranks, len(truth.positives)))
        precisions.append([precision_at(ranks, k) for k in ks])
    scored = [a for a in aps if a is not None]
    mp = np.mean(precisions, axis=0).tolist() if precisions else [None] * len(ks)
    return {
        "map": float(np.mean(scored)) if scored else None,
        "mp_at_k": {str(k): v for k, v in zip(ks, mp, strict=True)},
        "aps": aps,
        "num_evaluated": len(scored),
    }


def _concat(entry: dict[str, np.ndarray], keys: tuple[str, ...]) -> np.ndarray:
    parts = [np.asarray(entry.get(k, []), dtype=np.int64).reshape(-1) for k in keys]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def revisited_truths(gnd: Sequence[dict[str, np.ndarray]], protocol: str) -> list[QueryTruth]:
    """Per-query truths of a revisited Oxford/Paris protocol from the gnd entries ({easy, hard, junk}):
    easy: easy positives, hard ones junk; medium: easy + hard; hard: hard only, easy ones junk."""
    if protocol not in REVISITED_PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; one of {', '.join(REVISITED_PROTOCOLS)}")
    ok, junk = REVISITED_PROTOCOLS[protocol]
    return [QueryTruth(_concat(g, ok), _concat(g, junk)) for g in gnd]


def evaluate_revisited(
    rankings: np.ndarray, gnd: Sequence[dict[str, np.ndarray]], ks: Sequence[int] = PRECISION_KS
) -> dict[str, dict[str, Any]]:
    """{easy, medium, hard: mean_average_precision(...)}; the release reports medium and hard."""
    return {p: mean_average_precision(rankings, revisited_truths(gnd, p), ks) for p in REVISITED_PROTOCOLS}
