"""Retrieve: the four candidate sources. CF and content are model stages (in-process or a deployment each);
history and popularity are lists the bundle already holds.

CF and content take small typed queries that pickle cheaply to a model deployment, and answer a SourceList.
"""

from __future__ import annotations

import functools
import re
import threading
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from chain.types import Context, SourceList
from models.cf import ALSModel
from models.content import ContentModel
from models.popularity import Popularity
from models.ranking import top_n
from models.snapshot import Snapshot


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
    query: str | None  # free text: when given, it alone retrieves (the query mode; see ContentStage.retrieve)
    n: int


def normalize_query(text: str) -> str:
    """The text the encoder sees: trimmed, spaces collapsed, lower case (MiniLM's tokenizer lower-cases anyway)."""
    return re.sub(r"\s+", " ", text).strip().lower()


def _encode(model: ContentModel, lock: threading.Lock, text: str) -> np.ndarray:
    with lock:  # one encode at a time: a second thread only contends for the same cores
        return model.encode_query(text)


class ContentStage:
    # Text lengths (in words) the replica encodes before it reports ready: torch's first call at each shape is slow.
    WARM_WORDS = (1, 2, 4, 8, 16, 32, 48)
    _warmed: ClassVar[set[str]] = set()  # devices whose shared encoder has run at every WARM_WORDS length

    def __init__(self, model: ContentModel, cache_size: int = 4096) -> None:
        self.model = model
        # Queries repeat (search boxes, suggestions): a cached vector costs nothing. The cache holds the model, not
        # the stage, so a released stage is freed by reference counting (no cycle for a frozen GC to miss).
        self.encode = functools.lru_cache(maxsize=cache_size)(functools.partial(_encode, model, threading.Lock()))

    def warm(self) -> ContentStage:
        """Load the text encoder and run it once per WARM_WORDS length, not inside the first customer query. Once
        per process and device: every bundle shares the one encoder (models.content.load_encoder), so a rollout
        arm's bundle loads without another half second of encoding beside the requests being served."""
        if self.model.device in ContentStage._warmed:
            return self
        for n in self.WARM_WORDS:
            self.encode.__wrapped__(" ".join(["warm"] * n))
        ContentStage._warmed.add(self.model.device)
        return self

    def retrieve(self, q: ContentQuery, query_vector: np.ndarray | None = None) -> SourceList:
        """Without a query: the items nearest the user's taste profile, anchored on the profile item that explains
        each. With a query: the items nearest the query's text alone, so the answer is about what was asked (the
        blender then orders them for this user); `query_vector` is the query already encoded."""
        if q.query:
            vector = query_vector if query_vector is not None else self.encode(normalize_query(q.query))
            items, scores = top_n(self.model.score(vector), q.n)
            return SourceList(items, scores.astype(np.float32), np.full(items.shape[0], -1, dtype=np.int64))
        if not q.items.size:
            return SourceList.empty()
        items, scores = top_n(self.model.score(self.model.profile(q.items, q.weights)), q.n)
        return SourceList(items, scores.astype(np.float32), anchors(self.model.embeddings, items, q.items))

    def similar(self, item: int, n: int) -> SourceList:
        items, scores = self.model.similar(item, n)
        return SourceList(items, scores.astype(np.float32), np.full(items.shape[0], item, dtype=np.int64))


def history(snapshot: Snapshot, row: int | None, n: int) -> SourceList:
    """The user's n best purchases by recency-weighted score; each item is its own anchor."""
    if row is None:
        return SourceList.empty()
    items, scores = snapshot.history_list(row, n)
    return SourceList(items, scores.astype(np.float32), items)


def popular(popularity: Popularity, n: int) -> SourceList:
    items, scores = popularity.top(n)
    return SourceList(items, scores.astype(np.float32), np.full(items.shape[0], -1, dtype=np.int64))


def cf_query(ctx: Context, snapshot: Snapshot, n: int) -> CFQuery:
    """History, then session items not in it; the factor is folded in again only when the session adds events."""
    hist = ctx.history.items
    times, _ = snapshot.ui_features(ctx.row, hist)
    new = ctx.session[~np.isin(ctx.session, hist)]
    return CFQuery(
        user=ctx.row,
        items=np.concatenate([hist, new]),
        counts=np.concatenate([times, np.ones(new.shape[0])]),
        fold_in=ctx.session.size > 0,
        n=n,
    )


def content_query(ctx: Context, n: int, n_query: int, profile_items: int) -> ContentQuery:
    # The session leads the taste profile: what the user looks at now outweighs what they bought before.
    top_weight = float(ctx.history.scores[0]) if len(ctx.history) else 1.0
    weights = np.concatenate([np.full(ctx.session.shape[0], 2 * top_weight), ctx.history.scores])
    return ContentQuery(
        items=np.concatenate([ctx.session, ctx.history.items])[:profile_items],
        weights=weights[:profile_items],
        query=ctx.query.query,
        n=n_query if ctx.query.query else n,
    )
