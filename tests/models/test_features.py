from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.data import clean
from models.features import (
    BLENDER_FEATURES,
    ITEM_FEATURES,
    SOURCES,
    USER_NUMERIC_FEATURES,
    assemble,
    item_features,
    merge_sources,
    schema,
    user_features,
)
from models.snapshot import Snapshot
from tests.conftest import raw_rows

AS_OF = pd.Timestamp("2011-03-01")


@pytest.fixture
def data():
    return clean(
        raw_rows(
            [
                # user 1: two invoices, one with two lines
                {
                    "InvoiceNo": "1",
                    "CustomerID": 1,
                    "StockCode": "10001",
                    "Quantity": 2,
                    "UnitPrice": 1.5,
                    "InvoiceDate": "2011-01-01 10:00",
                },
                {
                    "InvoiceNo": "1",
                    "CustomerID": 1,
                    "StockCode": "10002",
                    "Quantity": 1,
                    "UnitPrice": 4.0,
                    "InvoiceDate": "2011-01-01 10:00",
                },
                {
                    "InvoiceNo": "2",
                    "CustomerID": 1,
                    "StockCode": "10001",
                    "Quantity": 4,
                    "UnitPrice": 1.0,
                    "InvoiceDate": "2011-02-20 12:00",
                },
                # user 2 in France
                {
                    "InvoiceNo": "3",
                    "CustomerID": 2,
                    "StockCode": "10002",
                    "Quantity": 3,
                    "UnitPrice": 4.0,
                    "InvoiceDate": "2011-02-27 00:00",
                    "Country": "France",
                },
                # a guest sale: counts for item popularity only
                {
                    "InvoiceNo": "4",
                    "CustomerID": None,
                    "StockCode": "10001",
                    "Quantity": 1,
                    "UnitPrice": 2.0,
                    "InvoiceDate": "2011-02-28 00:00",
                },
                # after the reference time: must not count
                {
                    "InvoiceNo": "5",
                    "CustomerID": 1,
                    "StockCode": "10003",
                    "Quantity": 9,
                    "UnitPrice": 9.0,
                    "InvoiceDate": "2011-03-05 00:00",
                },
            ]
        )
    )


def test_user_features_by_hand(data):
    u = user_features(data.interactions, AS_OF)
    assert list(u.index) == ["1", "2"]
    one = u.loc["1"]
    assert one["user_recency_days"] == pytest.approx(8.5)  # 2011-02-20 12:00 -> 2011-03-01
    assert one["user_order_count"] == 2
    assert one["user_total_spend"] == pytest.approx(2 * 1.5 + 4.0 + 4 * 1.0)
    assert one["user_distinct_items"] == 2
    assert one["user_avg_basket_size"] == pytest.approx(1.5)
    assert one["user_tenure_days"] == pytest.approx(58 + 14 / 24)
    assert one["user_country"] == "United Kingdom"
    assert u.loc["2", "user_country"] == "France"


def test_item_features_by_hand(data):
    i = item_features(data.sales, AS_OF)
    a = i.loc["10001"]
    assert a["item_pop_7d"] == 1  # the guest invoice on 02-28
    assert a["item_pop_30d"] == 2  # plus invoice 2 on 02-20
    assert a["item_pop_90d"] == 3
    assert a["item_buyers"] == 1  # guests are not buyers
    assert a["item_avg_price"] == pytest.approx((1.5 + 1.0 + 2.0) / 3)
    assert a["item_days_since_last_sale"] == pytest.approx(1.0)
    assert "10003" not in i.index  # first sold after the reference time


def test_snapshot_user_item_history(data):
    snap = Snapshot.build(data.sales, data.interactions, AS_OF, half_life_days=10.0)
    u = snap.user_index["1"]
    items = np.array([snap.item_index["10001"], snap.item_index["10002"]])
    times, last = snap.ui_features(u, items)
    assert times.tolist() == [2.0, 1.0]
    assert last[0] == pytest.approx(8.5)
    hist_items, hist_scores = snap.user_history(u)
    score = dict(zip(snap.item_ids[hist_items], hist_scores, strict=True))
    assert score["10001"] == pytest.approx(0.5 ** (8.5 / 10) + 0.5 ** ((58 + 14 / 24) / 10))
    times2, last2 = snap.ui_features(snap.user_index["2"], items[:1])
    assert times2.tolist() == [0.0] and np.isnan(last2[0])


def test_merge_sources_keeps_every_sources_rank():
    lists = {"cf": (np.array([5, 2]), np.array([0.9, 0.5])), "popularity": (np.array([2, 7]), np.array([30, 20]))}
    c = merge_sources(lists)
    assert c.items.tolist() == [2, 5, 7]
    cf, pop = SOURCES.index("cf"), SOURCES.index("popularity")
    assert c.ranks[:, cf].tolist()[:2] == [2.0, 1.0] and np.isnan(c.ranks[2, cf])
    assert c.ranks[0, pop] == 1.0 and c.scores[2, pop] == 20


def test_assemble_follows_the_schema_order():
    c = merge_sources({"history": (np.array([1, 0]), np.array([3.0, 1.0]))})
    item_matrix = np.arange(2 * len(ITEM_FEATURES), dtype=np.float32).reshape(2, -1)
    user_row = np.arange(len(USER_NUMERIC_FEATURES), dtype=np.float32) + 100
    x = assemble(c, user_row, item_matrix, np.array([1.0, 2.0]), np.array([np.nan, 4.0]))
    assert x.shape == (2, len(BLENDER_FEATURES))
    col = {n: j for j, n in enumerate(BLENDER_FEATURES)}
    assert x[0, col["history_rank"]] == 2 and x[1, col["history_rank"]] == 1
    assert x[1, col["n_sources"]] == 1
    assert x[1, col[ITEM_FEATURES[0]]] == item_matrix[1, 0]
    assert x[0, col[USER_NUMERIC_FEATURES[-1]]] == user_row[-1]
    assert x[1, col["ui_days_since_last_bought"]] == 4.0


def test_schema_hash_is_stable_and_names_unique():
    assert schema()["hash"] == schema()["hash"]
    assert len(set(BLENDER_FEATURES)) == len(BLENDER_FEATURES)
    assert "user_country" not in BLENDER_FEATURES
