"""Order: one ranking, best first. Scores never rise down the list, and two products with the same canonical
description (one product under two stock codes) are shown once, at the better one's place."""

from __future__ import annotations

import numpy as np


def order(items: np.ndarray, scores: np.ndarray, k: int, descriptions: np.ndarray) -> np.ndarray:
    """Positions into `items` of the k best (score descending, ties by lower catalog index), one per description.

    items: int64 catalog indices; scores: float (len(items),); descriptions: str per catalog item."""
    ranked = np.lexsort((items, -scores))
    out: list[int] = []
    seen: set[str] = set()
    for p in ranked.tolist():
        d = str(descriptions[items[p]])
        if d in seen:
            continue
        seen.add(d)
        out.append(p)
        if len(out) == k:
            break
    return np.asarray(out, dtype=np.int64)
