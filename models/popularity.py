"""Popularity: the baseline and the cold-start fallback."""

from __future__ import annotations

import numpy as np

from models.features import ITEM_FEATURES


class Popularity:
    """Items ranked by distinct invoices in the last 30 days, ties broken by all-time distinct buyers."""

    def __init__(self, item_matrix: np.ndarray) -> None:
        recent = item_matrix[:, ITEM_FEATURES.index("item_pop_30d")].astype(np.float64)
        buyers = item_matrix[:, ITEM_FEATURES.index("item_buyers")].astype(np.float64)
        self.scores = recent
        # lexsort sorts by the last key first: recent popularity, then buyers, then item index for stability.
        self.order = np.lexsort((np.arange(recent.shape[0]), -buyers, -recent)).astype(np.int64)

    def top(self, n: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        order = self.order
        if exclude is not None and exclude.size:
            order = order[~np.isin(order, exclude)]
        items = order[:n]
        return items, self.scores[items]
