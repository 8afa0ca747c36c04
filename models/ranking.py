"""Top-n selection shared by every model."""

from __future__ import annotations

import numpy as np


def top_n(scores: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the n highest scores, best first (ties by lower index)."""
    n = min(n, scores.shape[0])
    if n <= 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=scores.dtype)
    part = np.argpartition(-scores, n - 1)[:n] if n < scores.shape[0] else np.arange(scores.shape[0])
    order = part[np.lexsort((part, -scores[part]))]
    return order.astype(np.int64), scores[order]


def top_n_rows(scores: np.ndarray, n: int) -> np.ndarray:
    """Row-wise top-n column indices, best first, for a (users, items) score matrix."""
    n = min(n, scores.shape[1])
    part = (
        np.argpartition(-scores, n - 1, axis=1)[:, :n]
        if n < scores.shape[1]
        else np.tile(np.arange(scores.shape[1]), (scores.shape[0], 1))
    )
    vals = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1).astype(np.int64)
