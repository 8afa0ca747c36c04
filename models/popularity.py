"""Popularity: the baseline and the cold-start fallback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from models.errors import BundleIntegrityError
from models.features import ITEM_FEATURES

POPULARITY_FILE = "popularity.parquet"


class Popularity:
    """Items ranked by distinct invoices in the last 30 days, ties broken by all-time distinct buyers."""

    def __init__(self, order: np.ndarray, scores: np.ndarray) -> None:
        self.order = order.astype(np.int64)
        self.scores = scores.astype(np.float64)

    @classmethod
    def fit(cls, item_matrix: np.ndarray) -> Popularity:
        recent = item_matrix[:, ITEM_FEATURES.index("item_pop_30d")].astype(np.float64)
        buyers = item_matrix[:, ITEM_FEATURES.index("item_buyers")].astype(np.float64)
        # lexsort sorts by the last key first: recent popularity, then buyers, then item index for stability.
        return cls(np.lexsort((np.arange(recent.shape[0]), -buyers, -recent)), recent)

    def top(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The n most popular catalog indices, best first, and their scores."""
        items = self.order[:n]
        return items, self.scores[items]

    def save(self, directory: Path, item_ids: np.ndarray) -> list[str]:
        """The full ranking, best first: the list a serving replica falls back to."""
        frame = pd.DataFrame(
            {
                "rank": np.arange(1, self.order.shape[0] + 1),
                "item_id": item_ids[self.order],
                "item_index": self.order,
                "score": self.scores[self.order],
            }
        )
        frame.to_parquet(directory / POPULARITY_FILE, index=False)
        return [POPULARITY_FILE]

    @classmethod
    def load(cls, directory: Path, item_ids: np.ndarray) -> Popularity:
        frame = pd.read_parquet(directory / POPULARITY_FILE)
        order = frame["item_index"].to_numpy(dtype=np.int64)
        if len(frame) != item_ids.shape[0] or not np.array_equal(item_ids[order], frame["item_id"].to_numpy(str)):
            raise BundleIntegrityError(f"{directory / POPULARITY_FILE} does not match the bundle's catalog: retrain")
        scores = np.zeros(item_ids.shape[0])
        scores[order] = frame["score"].to_numpy(dtype=np.float64)
        return cls(order, scores)
