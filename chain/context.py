"""Fetch: the user's context for one request, from the feature store, or from the bundle when the store cannot
answer (flagged). Also the bundle as a feature store of its own, for offline runs, replay and tests."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np

from chain.ports import FeatureStore
from chain.retrieve import history
from chain.types import Context, Query, UserRow
from models.errors import FeatureStoreError
from models.realtime import Realtime
from models.snapshot import Snapshot


class BundleFeatures:
    """The bundle's batch features as a feature store: what the online store holds once the bundle is
    materialized and before any event. `windows` adds real-time event windows by user id (replay, tests)."""

    def __init__(self, snapshot: Snapshot, windows: dict[str, Realtime] | None = None) -> None:
        self.snapshot = snapshot
        self.item_matrix = snapshot.item_matrix
        self.windows = windows if windows is not None else {}

    def user(self, user_id: str) -> UserRow:
        row = self.snapshot.user_index.get(user_id)
        realtime = self.windows.get(user_id, Realtime.empty())
        if row is None:
            return UserRow.from_values(user_id, realtime.columns())
        country = str(self.snapshot.user_frame["user_country"].iat[row])
        return UserRow(user_id, True, self.snapshot.user_matrix[row], realtime, country)


class ContextFetcher:
    """One read of the store per request. When Redis fails, the bundle's features serve for `retry_s` before the
    store is tried again; `store_state()` (the replica's store watch: "ok", "empty", "unreachable") skips a store
    known to be down, and serves the bundle's batch rows when Redis lost them (events still come from Redis)."""

    def __init__(self, store: FeatureStore, snapshot: Snapshot, store_state: Callable[[], str] | None = None) -> None:
        self.store = store
        self.snapshot = snapshot
        self.bundle = BundleFeatures(snapshot)
        self.store_state = store_state
        self._down_until = 0.0

    @property
    def store_healthy(self) -> bool:
        return time.monotonic() >= self._down_until

    def row(self, user_id: str, retry_s: float) -> tuple[UserRow, str | None]:
        state = self.store_state() if self.store_state else "ok"
        live: UserRow | None = None
        if state != "unreachable" and self.store_healthy:
            try:
                live = self.store.user(user_id)
            except FeatureStoreError:
                self._down_until = time.monotonic() + retry_s
        if live is not None and state == "ok":
            return live, None
        fallback = self.bundle.user(user_id)
        if live is None:
            return fallback, "feature_store_unavailable"
        return dataclasses.replace(fallback, realtime=live.realtime), "feature_store_empty"

    def fetch(self, q: Query, n_history: int, session_events: int, retry_s: float) -> Context:
        user, problem = self.row(q.user_id, retry_s)
        return context(q, user, self.snapshot, n_history, session_events, problem)


def context(
    q: Query, user: UserRow, snapshot: Snapshot, n_history: int, session_events: int, problem: str | None = None
) -> Context:
    """The chain's view of one user: bundle row, history, this session's items (newest first, distinct, which of
    them were only viewed) and the excluded items, as catalog indices."""
    row = snapshot.user_index.get(q.user_id)
    seen: dict[int, bool] = {}
    for e in user.realtime.recent(session_events):
        i = snapshot.item_index.get(e.item_id)
        if i is not None:
            seen[i] = seen.get(i, True) and e.event_type == "view"
    exclude = [i for i in (snapshot.item_index.get(x) for x in q.exclude) if i is not None]
    return Context(
        query=q,
        row=row,
        numeric=user.numeric,
        history=history(snapshot, row, n_history),
        session=np.fromiter(seen, dtype=np.int64, count=len(seen)),
        viewed_only=frozenset(i for i, v in seen.items() if v),
        exclude=np.asarray(sorted(set(exclude)), dtype=np.int64),
        problem=problem,
        country=user.country,
    )
