"""The chain's step functions on small hand-made inputs: anchors, merge, filter, the single-source rung, order."""

from __future__ import annotations

import numpy as np

from chain.merge import filter_candidates, merge
from chain.order import order
from chain.retrieve import anchors
from chain.score import single_source
from chain.types import SourceList
from models.features import SOURCES


def lst(items: list[int], anchors_: list[int] | None = None) -> SourceList:
    a = np.array(items, dtype=np.int64)
    scores = np.linspace(1.0, 0.1, len(items)).astype(np.float32)
    return SourceList(a, scores, np.array(anchors_ if anchors_ else [-1] * len(items), dtype=np.int64))


def test_anchor_is_the_most_similar_basis_item_and_never_the_item_itself():
    unit = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    got = anchors(unit, candidates=np.array([1, 3, 0]), basis=np.array([0, 2]))
    assert got.tolist() == [0, 2, 2]  # item 0 cannot explain itself, so its anchor is the other basis item
    assert anchors(unit, np.array([1, 2]), np.array([], dtype=np.int64)).tolist() == [-1, -1]


def test_merge_keeps_every_sources_score_rank_and_anchor():
    c = merge({"cf": lst([7, 3], [1, 2]), "history": lst([3, 5], [3, 5]), "popularity": lst([9])})
    assert c.items.tolist() == [3, 5, 7, 9]
    cf, hist = SOURCES.index("cf"), SOURCES.index("history")
    assert c.ranks[:, cf].tolist()[0] == 2 and np.isnan(c.ranks[1, cf])  # 3 is CF's 2nd; 5 is not CF's
    assert c.anchors[0, cf] == 2 and c.anchors[0, hist] == 3 and c.anchors[3, cf] == -1
    assert c.proposed_by(0) == ("cf", "history") and c.proposed_by(3) == ("popularity",)


def test_filter_drops_excluded_items_and_in_query_mode_keeps_only_the_querys_matches():
    c = merge({"cf": lst([1, 2]), "content": lst([2, 3]), "popularity": lst([4])})
    assert filter_candidates(c, np.array([2]), query_mode=False).items.tolist() == [1, 3, 4]
    assert filter_candidates(c, np.array([3]), query_mode=True).items.tolist() == [2]


def test_the_single_source_rung_ranks_the_best_source_first_and_its_scores_fall():
    c = merge({"cf": lst([5, 6]), "history": lst([8, 6]), "popularity": lst([1, 2, 3])})
    scores, source = single_source(c)
    assert source == "history"
    ranked = c.items[np.argsort(-scores, kind="stable")].tolist()
    assert ranked[:2] == [8, 6] and set(ranked[2:]) == {1, 2, 3, 5}
    assert np.all(np.isfinite(scores))


def test_order_is_one_ranking_with_one_item_per_description():
    items = np.array([5, 3, 9, 7])
    scores = np.array([0.1, 0.9, 0.5, 0.9], dtype=np.float32)
    descriptions = np.array(["A", "B", "C", "D", "E", "F", "G", "H", "I", "C"])  # 9 and 2 share "C"... and 7 is "H"
    got = items[order(items, scores, k=3, descriptions=descriptions)].tolist()
    assert got == [3, 7, 9]  # ties by lower index
    twins = np.array(["X"] * 10)  # every item the same product: shown once
    assert items[order(items, scores, k=3, descriptions=twins)].tolist() == [3]
