from __future__ import annotations

import math

import pytest

from models.metrics import average_precision_at_k, coverage_at_k, ndcg_at_k, recall_at_k, summarize


def test_recall_counts_hits_over_all_truth():
    assert recall_at_k(["a", "b", "c"], {"a", "c", "z", "y"}, 2) == pytest.approx(1 / 4)
    assert recall_at_k(["a", "b", "c"], {"a", "c", "z", "y"}, 3) == pytest.approx(2 / 4)
    assert recall_at_k([], {"a"}, 10) == 0.0


def test_ndcg_hand_computed():
    # hits at ranks 1 and 3, two relevant items: DCG = 1 + 1/log2(4) = 1.5; IDCG = 1 + 1/log2(3)
    expected = 1.5 / (1 + 1 / math.log2(3))
    assert ndcg_at_k(["a", "x", "b"], {"a", "b"}, 10) == pytest.approx(expected)
    assert ndcg_at_k(["a", "b"], {"a", "b"}, 10) == pytest.approx(1.0)
    assert ndcg_at_k(["x", "a"], {"a"}, 1) == 0.0


def test_ndcg_ideal_is_capped_at_k():
    # 5 relevant, k=2, both slots hit: perfect.
    assert ndcg_at_k(["a", "b"], {"a", "b", "c", "d", "e"}, 2) == pytest.approx(1.0)


def test_average_precision_hand_computed():
    # hits at 1 and 3: (1/1 + 2/3) / min(2, 10)
    assert average_precision_at_k(["a", "x", "b"], {"a", "b"}, 10) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision_at_k(["x", "y"], {"a"}, 10) == 0.0


def test_coverage_counts_distinct_items_in_top_k():
    assert coverage_at_k([["a", "b", "c"], ["a", "d"]], n_catalog=10, k=2) == pytest.approx(3 / 10)


def test_summarize_averages_over_truth_users_and_counts_missing_lists_as_misses():
    truth = {"u1": {"a"}, "u2": {"b"}}
    row = summarize({"u1": ["a"]}, truth, n_catalog=4)
    assert row["users"] == 2
    assert row["recall@10"] == pytest.approx(0.5)
    assert row["ndcg@10"] == pytest.approx(0.5)
    assert row["coverage@10"] == pytest.approx(1 / 4)
