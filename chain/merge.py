"""Merge the sources into one candidate set, then filter it: what the caller excluded never reaches scoring, and
in the query mode only the query's own matches stay."""

from __future__ import annotations

import numpy as np

from chain.types import Candidates, SourceList
from models.features import SOURCES

CONTENT = SOURCES.index("content")


def merge(lists: dict[str, SourceList]) -> Candidates:
    """Union of each source's ranked list; an item keeps its score, rank and anchor from every source."""
    parts = [lists[s].items for s in SOURCES if s in lists]
    items = np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)
    n = items.shape[0]
    scores = np.full((n, len(SOURCES)), np.nan, dtype=np.float32)
    ranks = np.full((n, len(SOURCES)), np.nan, dtype=np.float32)
    anchor = np.full((n, len(SOURCES)), -1, dtype=np.int64)
    for j, s in enumerate(SOURCES):
        if s not in lists or not len(lists[s]):
            continue
        src = lists[s]
        pos = np.searchsorted(items, src.items)
        scores[pos, j] = src.scores
        ranks[pos, j] = np.arange(1, src.items.shape[0] + 1, dtype=np.float32)
        anchor[pos, j] = src.anchors
    return Candidates(items.astype(np.int64), scores, ranks, anchor)


def filter_candidates(cands: Candidates, exclude: np.ndarray, query_mode: bool) -> Candidates:
    """Drop excluded items; with a query, keep only the items the query's content retrieval proposed."""
    keep = ~np.isin(cands.items, exclude) if exclude.size else np.ones(len(cands), dtype=bool)
    if query_mode:
        keep &= ~np.isnan(cands.ranks[:, CONTENT])
    return cands if keep.all() else cands.take(keep)
