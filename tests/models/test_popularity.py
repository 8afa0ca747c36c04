from __future__ import annotations

import numpy as np
import pytest

from models.errors import BundleIntegrityError
from models.features import ITEM_FEATURES
from models.popularity import Popularity
from models.ranking import top_n, top_n_rows


def matrix(recent: list[float], buyers: list[float]) -> np.ndarray:
    m = np.zeros((len(recent), len(ITEM_FEATURES)), dtype=np.float32)
    m[:, ITEM_FEATURES.index("item_pop_30d")] = recent
    m[:, ITEM_FEATURES.index("item_buyers")] = buyers
    return m


def test_ranks_by_recent_invoices_then_buyers():
    pop = Popularity.fit(matrix([5, 9, 5, 0], [1, 1, 7, 100]))
    items, scores = pop.top(3)
    assert items.tolist() == [1, 2, 0]
    assert scores.tolist() == [9, 5, 5]


def test_save_load_round_trip_and_catalog_check(tmp_path):
    ids = np.array(["A", "B", "C", "D"])
    pop = Popularity.fit(matrix([5, 9, 5, 0], [1, 1, 7, 100]))
    pop.save(tmp_path, ids)
    back = Popularity.load(tmp_path, ids)
    assert back.order.tolist() == pop.order.tolist()
    np.testing.assert_array_equal(back.scores, pop.scores)
    with pytest.raises(BundleIntegrityError, match="does not match"):
        Popularity.load(tmp_path, np.array(["A", "B", "X", "D"]))


def test_top_n_orders_best_first_with_stable_ties():
    items, vals = top_n(np.array([0.1, 0.9, 0.5, 0.9]), 3)
    assert items.tolist() == [1, 3, 2] and vals.tolist() == [0.9, 0.9, 0.5]
    assert top_n(np.array([1.0, 2.0]), 5)[0].tolist() == [1, 0]
    rows = top_n_rows(np.array([[0.1, 0.9, 0.5], [3.0, 1.0, 2.0]]), 2)
    assert rows.tolist() == [[1, 2], [0, 2]]
