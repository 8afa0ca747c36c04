"""The world as of one instant: catalog, users, purchase history and batch features, from rows before it.

A Snapshot is what every model and feature for a cutoff reads, and what the bundle stores as plain
parquet files, so training, evaluation and serving see the same state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from models.data import as_of as rows_before
from models.data import canonical_descriptions, days_between
from models.features import (
    BUNDLE_KEY,
    EVENT_TIMESTAMP,
    ITEM_FEATURES,
    ITEM_KEY,
    USER_FEATURES,
    USER_KEY,
    USER_NUMERIC_FEATURES,
    item_features,
    user_features,
)

CATALOG_FILE = "catalog.parquet"
ITEM_FEATURES_FILE = "item_features.parquet"
USER_FEATURES_FILE = "user_features.parquet"
INTERACTIONS_FILE = "interactions.parquet"


def decay(days: np.ndarray | float, half_life_days: float) -> np.ndarray:
    return np.power(0.5, np.asarray(days, dtype=np.float64) / half_life_days)


def history_pairs(interactions: pd.DataFrame, as_of: pd.Timestamp, half_life_days: float) -> pd.DataFrame:
    """Per (user, item): distinct invoices, last purchase and a recency-weighted purchase score.

    history_score = sum over the pair's invoices of 0.5 ** (age_days / half_life), so a later reference
    time t' gives score(t) * 0.5 ** ((t' - t) / half_life) plus what was bought since: it updates exactly.
    """
    rows = rows_before(interactions, as_of)
    inv = rows.groupby(["user_id", "item_id", "invoice"], observed=True)["ts"].min().reset_index()
    inv["w"] = decay(days_between(as_of, inv["ts"]), half_life_days)
    g = inv.groupby(["user_id", "item_id"], observed=True)
    pairs = pd.DataFrame(
        {"times_bought": g.size(), "last_bought": g["ts"].max(), "history_score": g["w"].sum()}
    ).reset_index()
    pairs["user_id"] = pairs["user_id"].astype("string")
    pairs["item_id"] = pairs["item_id"].astype("string")
    return pairs


@dataclass
class Snapshot:
    as_of: pd.Timestamp
    half_life_days: float
    item_ids: np.ndarray  # str, catalog order: item index i is item_ids[i]
    descriptions: np.ndarray  # str, aligned with item_ids
    item_matrix: np.ndarray  # float32 (n_items, len(ITEM_FEATURES))
    user_frame: pd.DataFrame  # USER_FEATURES, indexed by user_id, row order = user index
    pairs: pd.DataFrame  # user_id, item_id, times_bought, last_bought, history_score

    def __post_init__(self) -> None:
        self.item_index = {item: i for i, item in enumerate(self.item_ids.tolist())}
        self.user_ids = self.user_frame.index.to_numpy(dtype=str)
        self.user_index = {user: u for u, user in enumerate(self.user_ids.tolist())}
        self.user_matrix = self.user_frame[list(USER_NUMERIC_FEATURES)].to_numpy(dtype=np.float32)
        u = self.pairs["user_id"].map(self.user_index).to_numpy(dtype=np.int64)
        i = self.pairs["item_id"].map(self.item_index).to_numpy(dtype=np.int64)
        shape = (len(self.user_ids), len(self.item_ids))

        def csr(values: np.ndarray) -> sp.csr_matrix:
            # Built from one (u, i) pattern, so the three matrices share indices and indptr.
            m = sp.csr_matrix((values, (u, i)), shape=shape, dtype=np.float64)
            m.sort_indices()
            return m

        self.times_bought = csr(self.pairs["times_bought"].to_numpy(dtype=np.float64))
        # Stored as age + 1 so that a purchase on the reference day is not an implicit zero.
        self.last_age_plus1 = csr(days_between(self.as_of, self.pairs["last_bought"]) + 1.0)
        self.history_score = csr(self.pairs["history_score"].to_numpy(dtype=np.float64))

    @classmethod
    def build(
        cls, sales: pd.DataFrame, interactions: pd.DataFrame, as_of: pd.Timestamp, half_life_days: float
    ) -> Snapshot:
        sales_before = rows_before(sales, as_of)
        items = item_features(sales_before, as_of)
        descriptions = canonical_descriptions(sales_before).reindex(items.index)
        return cls(
            as_of=as_of,
            half_life_days=half_life_days,
            item_ids=items.index.to_numpy(dtype=str),
            descriptions=descriptions.to_numpy(dtype=str),
            item_matrix=items.to_numpy(dtype=np.float32),
            user_frame=user_features(interactions, as_of),
            pairs=history_pairs(interactions, as_of, half_life_days),
        )

    def user_history(self, u: int) -> tuple[np.ndarray, np.ndarray]:
        """Items the user bought and their recency-weighted scores."""
        row = self.history_score
        lo, hi = row.indptr[u], row.indptr[u + 1]
        return row.indices[lo:hi].astype(np.int64), row.data[lo:hi]

    def history_list(self, u: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The user's n best items by recency-weighted score, best first (ties by item index)."""
        items, scores = self.user_history(u)
        order = np.lexsort((items, -scores))[:n]
        return items[order], scores[order]

    def ui_features(self, u: int | None, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ui_times_bought and ui_days_since_last_bought for the given items (0 and NaN if never bought)."""
        if u is None:
            return np.zeros(items.shape[0]), np.full(items.shape[0], np.nan)
        lo, hi = self.times_bought.indptr[u], self.times_bought.indptr[u + 1]
        if hi == lo:
            return np.zeros(items.shape[0]), np.full(items.shape[0], np.nan)
        bought = self.times_bought.indices[lo:hi]
        pos = np.searchsorted(bought, items).clip(max=hi - lo - 1)
        hit = bought[pos] == items
        times = np.where(hit, self.times_bought.data[lo:hi][pos], 0.0)
        last = np.where(hit, self.last_age_plus1.data[lo:hi][pos] - 1.0, np.nan)
        return times, last

    def save(self, directory: Path, version: str) -> list[str]:
        catalog = pd.DataFrame({"item_id": self.item_ids, "description": self.descriptions})
        items = pd.DataFrame(self.item_matrix, columns=list(ITEM_FEATURES))
        items.insert(0, ITEM_KEY, self.item_ids)
        users = self.user_frame.reset_index().rename(columns={"user_id": USER_KEY})
        # These are the Feast file sources: rows keyed by bundle version, valid as of the snapshot.
        for frame in (items, users):
            frame.insert(1, BUNDLE_KEY, version)
            frame[EVENT_TIMESTAMP] = self.as_of.tz_localize("UTC")
        catalog.to_parquet(directory / CATALOG_FILE, index=False)
        items.to_parquet(directory / ITEM_FEATURES_FILE, index=False)
        users.to_parquet(directory / USER_FEATURES_FILE, index=False)
        self.pairs.to_parquet(directory / INTERACTIONS_FILE, index=False)
        return [CATALOG_FILE, ITEM_FEATURES_FILE, USER_FEATURES_FILE, INTERACTIONS_FILE]

    @classmethod
    def load(cls, directory: Path, as_of: pd.Timestamp, half_life_days: float) -> Snapshot:
        catalog = pd.read_parquet(directory / CATALOG_FILE)
        items = pd.read_parquet(directory / ITEM_FEATURES_FILE)
        users = pd.read_parquet(directory / USER_FEATURES_FILE).set_index("user_id")
        users.index = users.index.astype("string")
        return cls(
            as_of=as_of,
            half_life_days=half_life_days,
            item_ids=catalog["item_id"].to_numpy(dtype=str),
            descriptions=catalog["description"].to_numpy(dtype=str),
            item_matrix=items[list(ITEM_FEATURES)].to_numpy(dtype=np.float32),
            user_frame=users[list(USER_FEATURES)],
            pairs=pd.read_parquet(directory / INTERACTIONS_FILE),
        )
