"""Retrieval metrics against hand-computed rankings: average precision, junk taken out, queries without
positives, precision at k, and the revisited Oxford / Paris medium and hard protocols."""

import numpy as np
import pytest

from eval.retrieval.metrics import (
    QueryTruth,
    average_precision,
    evaluate_revisited,
    mean_average_precision,
    positive_ranks,
)


def _truth(pos, junk=()):
    return QueryTruth(np.asarray(pos, dtype=np.int64), np.asarray(junk, dtype=np.int64))


def test_average_precision_by_hand():
    # Positives at ranks 0 and 2 of 2: trapezoids (1 + 1)/2 * 1/2 + (1/2 + 2/3)/2 * 1/2 = 0.5 + 0.291666...
    assert average_precision([0, 2], 2) == pytest.approx(0.5 + 7 / 24)
    assert average_precision([0, 1], 2) == 1.0
    # The only positive at rank 3: (0/3 + 1/4)/2 = 0.125.
    assert average_precision([3], 1) == pytest.approx(0.125)
    # One of two positives found at rank 0, the other never: half the recall.
    assert average_precision([0], 2) == pytest.approx(0.5)
    assert average_precision([], 3) == 0.0


def test_junk_is_taken_out_of_the_ranking():
    ranking = np.array([7, 3, 5, 4, 1])  # gallery indices, best first
    assert positive_ranks(ranking, _truth([3, 4])).tolist() == [1, 3]
    # 7 and 5 are junk: the ranking becomes [3, 4, 1], positives at 0 and 1 -> AP 1.
    assert positive_ranks(ranking, _truth([3, 4], [7, 5])).tolist() == [0, 1]
    result = mean_average_precision(ranking[None], [_truth([3, 4], [7, 5])])
    assert result["map"] == 1.0
    # Without the junk: positives at ranks 1 and 3 of 2 -> (0 + 1/2)/2/2 + (1/3 + 2/4)/2/2.
    plain = mean_average_precision(ranking[None], [_truth([3, 4])])
    assert plain["map"] == pytest.approx(0.125 + 5 / 24)


def test_queries_without_positives_are_left_out_and_precision_at_k():
    rankings = np.array([[0, 1, 2, 3], [2, 0, 1, 3], [0, 1, 2, 3]])
    truths = [_truth([0]), _truth([0, 1]), _truth([])]
    result = mean_average_precision(rankings, truths, ks=(1, 2))
    # Query 2: positives at ranks 1, 2 -> (0 + 1/2)/4 + (1/2 + 2/3)/4 = 5/12.
    assert result["aps"] == [1.0, pytest.approx(5 / 12), None]
    assert result["num_evaluated"] == 2 and result["map"] == pytest.approx((1 + 5 / 12) / 2)
    # P@1: 1 and 0; P@2: query 1 caps k at its last positive (1) -> 1, query 2 -> 1/2.
    assert result["mp_at_k"] == {"1": 0.5, "2": 0.75}


def test_revisited_medium_and_hard_protocols_by_hand():
    ranking = np.array([[4, 0, 1, 2, 3]])
    gnd = [{"easy": np.array([0]), "hard": np.array([2]), "junk": np.array([4])}]
    r = evaluate_revisited(ranking, gnd, ks=(1,))
    # Medium: junk 4 removed -> [0, 1, 2, 3]; positives {0, 2} at ranks 0 and 2.
    assert r["medium"]["map"] == pytest.approx(0.5 + 7 / 24)
    # Hard: easy 0 is junk too -> [1, 2, 3]; the positive 2 at rank 1: (0 + 1/2)/2.
    assert r["hard"]["map"] == pytest.approx(0.25)
    # Easy: hard 2 is junk -> [0, 1, 3]; positive 0 first.
    assert r["easy"]["map"] == 1.0
