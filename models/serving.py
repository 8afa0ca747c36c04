"""The request-time stages over one bundle, as plain classes: retrieve (CF, content), score (blender), order.

Ray Serve deployments are thin shells over these; the colocated topology calls them in-process. Queries and
results are small typed objects that pickle cheaply between deployments.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from models.blender import Blender
from models.cf import ALSModel
from models.content import ContentModel
from models.ranking import top_n


@dataclass(frozen=True)
class SourceList:
    """One source's ranked candidates: catalog indices, scores, and per item the user's item that explains it
    (the anchor of "bought together with X" / "similar to Y"), -1 where none does."""

    items: np.ndarray
    scores: np.ndarray
    anchors: np.ndarray

    @classmethod
    def empty(cls) -> SourceList:
        return cls(np.empty(0, np.int64), np.empty(0, np.float32), np.empty(0, np.int64))

    def __len__(self) -> int:
        return int(self.items.shape[0])


def _unit_rows(m: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    return (m / np.maximum(norms, 1e-12)).astype(np.float32)


def anchors(unit: np.ndarray, candidates: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """For each candidate, the basis item most similar to it (cosine over unit rows); -1 if no basis."""
    if basis.size == 0 or candidates.size == 0:
        return np.full(candidates.shape[0], -1, dtype=np.int64)
    sims = unit[candidates] @ unit[basis].T
    sims[candidates[:, None] == basis[None, :]] = -np.inf  # an item does not explain itself
    return basis[np.argmax(sims, axis=1)].astype(np.int64)


@dataclass(frozen=True)
class CFQuery:
    user: int | None  # the user's row in the bundle, None for a user it never saw
    items: np.ndarray  # the user's items: purchase history, then this session's events
    counts: np.ndarray  # per item: times bought, or 1 for an event
    fold_in: bool  # recompute the user factor from `items` (new events, or a new user)
    n: int


class CFStage:
    def __init__(self, model: ALSModel, device: str = "cpu") -> None:
        self.model = model
        self.device = device
        self._unit = _unit_rows(model.item_factors)
        self._gpu_factors = None
        if device != "cpu":
            import torch

            self._gpu_factors = torch.from_numpy(model.item_factors).to(device)

    def _score(self, vector: np.ndarray) -> np.ndarray:
        if self._gpu_factors is None:
            return self.model.score(vector)
        import torch

        v = torch.from_numpy(np.ascontiguousarray(vector, dtype=np.float32)).to(self.device)
        return (self._gpu_factors @ v).cpu().numpy()

    def retrieve(self, q: CFQuery) -> SourceList:
        if q.user is not None and not q.fold_in:
            vector = self.model.user_factors[q.user]
        elif q.items.size:
            vector = self.model.fold_in_user(q.items, q.counts)
        else:
            return SourceList.empty()
        items, scores = top_n(self._score(vector), q.n)
        return SourceList(items, scores.astype(np.float32), anchors(self._unit, items, np.unique(q.items)))


@dataclass(frozen=True)
class ContentQuery:
    items: np.ndarray  # profile items, most important first
    weights: np.ndarray
    query: str | None
    n: int


class ContentStage:
    QUERY_WEIGHT = 0.7  # a free-text query steers the profile, it does not replace it

    def __init__(self, model: ContentModel) -> None:
        self.model = model

    def encode(self, text: str) -> np.ndarray:
        return self.model.encode_query(text)

    def warm(self) -> ContentStage:
        """Load the text encoder now (about a second), not inside the first request that has a query."""
        self.encode("warm up")
        return self

    def retrieve(self, q: ContentQuery, query_vector: np.ndarray | None = None) -> SourceList:
        """`query_vector`: the query already encoded (a batching caller encodes many at once)."""
        vector = self.model.profile(q.items, q.weights)
        if q.query:
            encoded = query_vector if query_vector is not None else self.encode(q.query)
            v = self.QUERY_WEIGHT * encoded + (1 - self.QUERY_WEIGHT) * vector
            vector = v / max(float(np.linalg.norm(v)), 1e-12)
        elif not q.items.size:
            return SourceList.empty()
        items, scores = top_n(self.model.score(vector), q.n)
        return SourceList(items, scores.astype(np.float32), anchors(self.model.embeddings, items, q.items))

    def similar(self, item: int, n: int) -> SourceList:
        items, scores = self.model.similar(item, n)
        return SourceList(items, scores.astype(np.float32), np.full(items.shape[0], item, dtype=np.int64))


class BlendStage:
    def __init__(self, model: Blender) -> None:
        self.model = model

    def score(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict(x).astype(np.float32)


@dataclass
class Ranked:
    items: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)


def order(
    items: np.ndarray, scores: np.ndarray, k: int, exclude: set[int], fill: np.ndarray, fill_scores: np.ndarray
) -> Ranked:
    """Business rules, last: best first, distinct, never an excluded item; short lists filled from `fill`
    (popularity), so the answer holds k items whenever the catalog allows."""
    out = Ranked()
    seen = set(exclude)
    ranked = np.lexsort((items, -scores))
    for source_items, source_scores, idx in ((items, scores, ranked), (fill, fill_scores, range(len(fill)))):
        for i in idx:
            item = int(source_items[i])
            if item in seen:
                continue
            seen.add(item)
            out.items.append(item)
            out.scores.append(float(source_scores[i]))
            if len(out.items) == k:
                return out
    return out
