"""Request-time stage logic on small hand-made inputs: anchors, business rules, CF fold-in."""

from __future__ import annotations

import numpy as np

from models.serving import anchors, order


def test_anchor_is_the_most_similar_basis_item_and_never_the_item_itself():
    unit = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    got = anchors(unit, candidates=np.array([1, 3, 0]), basis=np.array([0, 2]))
    assert got.tolist() == [0, 2, 2]  # item 0 cannot explain itself, so its anchor is the other basis item
    assert anchors(unit, np.array([1, 2]), np.array([], dtype=np.int64)).tolist() == [-1, -1]


def test_rules_rank_dedupe_exclude_and_fill_to_k():
    items = np.array([5, 3, 9, 7])
    scores = np.array([0.1, 0.9, 0.5, 0.9], dtype=np.float32)
    fill = np.array([9, 1, 2, 3, 4])
    out = order(items, scores, k=6, exclude={7}, fill=fill, fill_scores=np.zeros(5))
    assert out.items == [3, 9, 5, 1, 2, 4]  # ties by lower index; 7 excluded; filled from popularity, distinct
    assert out.scores[:3] == [np.float32(0.9), np.float32(0.5), np.float32(0.1)]
    short = order(np.array([1]), np.array([1.0]), k=10, exclude=set(), fill=np.array([1, 2]), fill_scores=np.zeros(2))
    assert short.items == [1, 2]  # the catalog allows no more
