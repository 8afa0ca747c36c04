"""Ranking metrics with binary relevance. Each takes a ranked list and the set of relevant items.

recall@k = hits in the top k / |truth|. NDCG@k uses gain 1/log2(rank + 1) and the ideal DCG of
min(|truth|, k) hits. AP@k averages precision at each hit over min(|truth|, k). Coverage@k is the share of
the catalog that appears in at least one user's top k.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np


def recall_at_k(ranked: Sequence[object], truth: set[object], k: int) -> float:
    if not truth:
        return 0.0
    return sum(1 for x in ranked[:k] if x in truth) / len(truth)


def ndcg_at_k(ranked: Sequence[object], truth: set[object], k: int) -> float:
    if not truth:
        return 0.0
    dcg = sum(1.0 / np.log2(i + 2) for i, x in enumerate(ranked[:k]) if x in truth)
    idcg = sum(1.0 / np.log2(i + 2) for i in range(min(len(truth), k)))
    return float(dcg / idcg)


def average_precision_at_k(ranked: Sequence[object], truth: set[object], k: int) -> float:
    if not truth:
        return 0.0
    hits, total = 0, 0.0
    for i, x in enumerate(ranked[:k]):
        if x in truth:
            hits += 1
            total += hits / (i + 1)
    return total / min(len(truth), k)


def coverage_at_k(rankings: Iterable[Sequence[object]], n_catalog: int, k: int) -> float:
    seen: set[object] = set()
    for ranked in rankings:
        seen.update(ranked[:k])
    return len(seen) / n_catalog if n_catalog else 0.0


METRIC_NAMES = ("recall@10", "recall@50", "ndcg@10", "map@10", "coverage@10")


def summarize(rankings: dict[str, Sequence[object]], truth: dict[str, set[object]], n_catalog: int) -> dict:
    """The table's row for one system: means over the users in `truth`."""
    users = [u for u in truth if truth[u]]
    if not users:
        return {**{m: None for m in METRIC_NAMES}, "users": 0}
    pairs = [(rankings.get(u, []), truth[u]) for u in users]

    def mean(metric: Callable[[Sequence[object], set[object], int], float], k: int) -> float:
        return float(np.mean([metric(r, t, k) for r, t in pairs]))

    return {
        "recall@10": mean(recall_at_k, 10),
        "recall@50": mean(recall_at_k, 50),
        "ndcg@10": mean(ndcg_at_k, 10),
        "map@10": mean(average_precision_at_k, 10),
        "coverage@10": coverage_at_k((r for r, _ in pairs), n_catalog, 10),
        "users": len(users),
    }
