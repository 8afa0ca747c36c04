"""Every feature's one name and definition, and the one code path that computes them.

Training and serving both call `user_features`, `item_features` and `assemble`, so the blender sees the
same numbers offline and online. The Feast definitions (feature_repo/) build their schemas from FEATURES.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from models.data import days_between, window

Group = Literal["source", "item", "user", "user_item", "realtime"]
Dtype = Literal["float32", "int64", "string", "int64_list", "string_list"]
SOURCES = ("cf", "content", "history", "popularity")
# Join keys and the timestamp column of the feature files, shared with the Feast definitions (feature_repo/).
USER_KEY = "user_id"
ITEM_KEY = "item_id"
# Batch rows are keyed by bundle too, so two bundles' features coexist in one online store.
BUNDLE_KEY = "bundle_version"
EVENT_TIMESTAMP = "event_timestamp"
POPULARITY_WINDOWS_DAYS = (7, 30, 90)


@dataclass(frozen=True)
class Feature:
    name: str
    dtype: Dtype
    group: Group
    description: str
    blender: bool = True
    # What a user or item the store has no row for gets: NaN is LightGBM's "missing".
    default: float | str | None = float("nan")


FEATURES: tuple[Feature, ...] = (
    *(
        f
        for s in SOURCES
        for f in (
            Feature(f"{s}_score", "float32", "source", f"{s} retrieval score; missing when {s} did not propose"),
            Feature(f"{s}_rank", "float32", "source", f"1-based rank in {s}'s list; missing when absent"),
        )
    ),
    Feature("n_sources", "float32", "source", "how many sources proposed the item"),
    *(
        Feature(f"item_pop_{d}d", "float32", "item", f"distinct invoices with the item in the {d} days before")
        for d in POPULARITY_WINDOWS_DAYS
    ),
    Feature("item_buyers", "float32", "item", "distinct customers who bought the item"),
    Feature("item_avg_price", "float32", "item", "mean unit price, GBP"),
    Feature("item_days_since_first_sale", "float32", "item", "days from the first sale to the reference time"),
    Feature("item_days_since_last_sale", "float32", "item", "days from the last sale to the reference time"),
    Feature("user_recency_days", "float32", "user", "days since the user's last order"),
    Feature("user_order_count", "float32", "user", "distinct invoices", default=0.0),
    Feature("user_total_spend", "float32", "user", "sum of quantity x unit price, GBP", default=0.0),
    Feature("user_distinct_items", "float32", "user", "distinct items bought", default=0.0),
    Feature("user_avg_basket_size", "float32", "user", "mean distinct items per invoice"),
    Feature("user_tenure_days", "float32", "user", "days since the user's first order", default=0.0),
    Feature(
        "user_country", "string", "user", "most frequent country on the user's invoices", blender=False, default=""
    ),
    Feature("ui_times_bought", "float32", "user_item", "distinct invoices in which the user bought the item"),
    Feature(
        "ui_days_since_last_bought", "float32", "user_item", "days since the user last bought it; missing if never"
    ),
    # Written by POST /events through Feast's push path: the retained events, newest first, as parallel lists
    # (models/realtime.py reads them back; the chain takes the newest as the session).
    *(
        Feature(name, dtype, "realtime", description, blender=False, default=None)
        for name, dtype, description in (
            ("rt_event_item_ids", "string_list", "item ids of the retained events, newest first"),
            ("rt_event_types", "string_list", "event types (view, add_to_cart, purchase), aligned with the ids"),
            ("rt_event_ts_ms", "int64_list", "event times in ms since the epoch, UTC, aligned with the ids"),
            ("rt_last_event_ts_ms", "int64", "time of the newest event, ms since the epoch"),
            ("rt_event_count", "int64", "events accepted for the user since the store was created"),
        )
    ),
)

BLENDER_FEATURES: tuple[str, ...] = tuple(f.name for f in FEATURES if f.blender)
ITEM_FEATURES: tuple[str, ...] = tuple(f.name for f in FEATURES if f.group == "item")
USER_FEATURES: tuple[str, ...] = tuple(f.name for f in FEATURES if f.group == "user")
USER_NUMERIC_FEATURES: tuple[str, ...] = tuple(f.name for f in FEATURES if f.group == "user" and f.blender)
REALTIME_FEATURES: tuple[str, ...] = tuple(f.name for f in FEATURES if f.group == "realtime")
BY_NAME: dict[str, Feature] = {f.name: f for f in FEATURES}


def schema() -> dict[str, object]:
    """Names, dtypes and a hash of the blender's input; the manifest stores it and loading compares it."""
    cols = [{"name": f.name, "dtype": f.dtype, "group": f.group} for f in FEATURES if f.blender]
    digest = hashlib.sha256(json.dumps(cols, sort_keys=True).encode()).hexdigest()
    return {"features": cols, "hash": digest}


def user_features(interactions: pd.DataFrame, as_of: pd.Timestamp) -> pd.DataFrame:
    """Batch user features from the per-user rows strictly before `as_of`; indexed by user_id."""
    rows = interactions[interactions["ts"] < as_of]
    spend = rows["quantity"] * rows["price"]
    g = rows.assign(spend=spend).groupby("user_id", observed=True)
    per_invoice = rows.groupby(["user_id", "invoice"], observed=True)["item_id"].nunique()
    out = pd.DataFrame(
        {
            "user_recency_days": days_between(as_of, g["ts"].max()),
            "user_order_count": g["invoice"].nunique(),
            "user_total_spend": g["spend"].sum(),
            "user_distinct_items": g["item_id"].nunique(),
            "user_avg_basket_size": per_invoice.groupby(level=0, observed=True).mean(),
            "user_tenure_days": days_between(as_of, g["ts"].min()),
        }
    )
    out = out.astype("float32")
    country = rows.groupby(["user_id", "country"], observed=True).size().reset_index(name="n")
    country = country.sort_values(["user_id", "n", "country"], ascending=[True, False, True])
    out["user_country"] = country.drop_duplicates("user_id").set_index("user_id")["country"].astype("string")
    out.index = out.index.astype("string")
    out.index.name = "user_id"
    return out[list(USER_FEATURES)]


def item_features(sales: pd.DataFrame, as_of: pd.Timestamp) -> pd.DataFrame:
    """Batch item features from all sales strictly before `as_of` (guest checkouts count); by item_id."""
    rows = sales[sales["ts"] < as_of]
    g = rows.groupby("item_id", observed=True)
    out = pd.DataFrame(index=pd.Index(g.size().index, name="item_id"))
    for d in POPULARITY_WINDOWS_DAYS:
        recent = window(rows, as_of - pd.Timedelta(days=d), as_of)
        out[f"item_pop_{d}d"] = recent.groupby("item_id", observed=True)["invoice"].nunique()
    out["item_buyers"] = g["user_id"].nunique()
    out["item_avg_price"] = g["price"].mean()
    out["item_days_since_first_sale"] = days_between(as_of, g["ts"].min())
    out["item_days_since_last_sale"] = days_between(as_of, g["ts"].max())
    out = out.fillna({f"item_pop_{d}d": 0.0 for d in POPULARITY_WINDOWS_DAYS}).astype("float32")
    out.index = out.index.astype("string")
    return out[list(ITEM_FEATURES)]


@dataclass(frozen=True)
class Candidates:
    """One user's merged candidate set: item indices plus each source's score and rank (NaN if absent)."""

    items: np.ndarray  # int64 (n,)
    scores: np.ndarray  # float32 (n, len(SOURCES))
    ranks: np.ndarray  # float32 (n, len(SOURCES))

    def __len__(self) -> int:
        return int(self.items.shape[0])


def merge_sources(lists: dict[str, tuple[np.ndarray, np.ndarray]]) -> Candidates:
    """Union of each source's ranked (items, scores); an item keeps its score and rank from every source."""
    parts = [lists[s][0] for s in SOURCES if s in lists]
    items = np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)
    n = items.shape[0]
    scores = np.full((n, len(SOURCES)), np.nan, dtype=np.float32)
    ranks = np.full((n, len(SOURCES)), np.nan, dtype=np.float32)
    for j, s in enumerate(SOURCES):
        if s not in lists:
            continue
        src_items, src_scores = lists[s]
        pos = np.searchsorted(items, src_items)
        scores[pos, j] = src_scores
        ranks[pos, j] = np.arange(1, src_items.shape[0] + 1, dtype=np.float32)
    return Candidates(items=items.astype(np.int64), scores=scores, ranks=ranks)


def assemble(
    cands: Candidates,
    user_row: np.ndarray,
    item_matrix: np.ndarray,
    ui_times_bought: np.ndarray,
    ui_days_since_last: np.ndarray,
) -> np.ndarray:
    """The blender's input for one user's candidates, in BLENDER_FEATURES order.

    user_row: the user's USER_NUMERIC_FEATURES; item_matrix: ITEM_FEATURES for every catalog item;
    ui_*: per candidate, aligned with cands.items (0 and NaN when the user never bought it).
    """
    n = len(cands)
    n_sources = np.sum(~np.isnan(cands.ranks), axis=1, dtype=np.float32)[:, None]
    source_block = np.empty((n, 2 * len(SOURCES)), dtype=np.float32)
    source_block[:, 0::2] = cands.scores
    source_block[:, 1::2] = cands.ranks
    return np.hstack(
        [
            source_block,
            n_sources,
            item_matrix[cands.items],
            np.broadcast_to(user_row.astype(np.float32), (n, user_row.shape[0])),
            ui_times_bought.astype(np.float32)[:, None],
            ui_days_since_last.astype(np.float32)[:, None],
        ]
    )
