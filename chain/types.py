"""The small typed objects the chain's stages hand each other.

Query → Context → SourceList per source → Candidates → feature rows (float32 matrix) → Scored → Recommendation.
Item positions are catalog indices (int64) of the bundle's snapshot throughout; ids are strings only at the ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.features import BY_NAME, REALTIME_FEATURES, SOURCES, USER_FEATURES, USER_NUMERIC_FEATURES
from models.realtime import Realtime


@dataclass(frozen=True)
class Query:
    """One request. `exclude` holds item ids as the data cleans them (trimmed, upper-case)."""

    user_id: str
    k: int = 10
    exclude: tuple[str, ...] = ()
    query: str | None = None


def numeric_values(values: dict[str, Any], names: tuple[str, ...]) -> np.ndarray:
    """float32 (len(names),): each named value, or the feature's default (models/features.py) where None."""
    return np.array(
        [float(BY_NAME[n].default) if values.get(n) is None else values[n] for n in names],  # type: ignore[arg-type]
        dtype=np.float32,
    )


@dataclass(frozen=True)
class UserRow:
    """What the feature store holds for one user: batch features and the real-time event window."""

    user_id: str
    known: bool  # the bundle has a batch row for this user
    numeric: np.ndarray  # float32 (len(USER_NUMERIC_FEATURES),); each feature's default when unknown
    realtime: Realtime
    country: str = ""  # user_country: stored and read, not (yet) a blender feature

    @classmethod
    def from_values(cls, user_id: str, values: dict[str, Any]) -> UserRow:
        """From feature name → stored value (None where absent), whichever store produced them."""
        return cls(
            user_id=user_id,
            known=any(values.get(n) is not None for n in USER_FEATURES),
            numeric=numeric_values(values, USER_NUMERIC_FEATURES),
            realtime=Realtime.from_columns({n: values.get(n) for n in REALTIME_FEATURES}),
            country=str(values.get("user_country") or BY_NAME["user_country"].default),
        )


@dataclass(frozen=True)
class SourceList:
    """One source's ranked candidates: catalog indices, scores, and per item the user's item that explains it
    (the anchor of "bought together with X" / "similar to Y"), -1 where none does."""

    items: np.ndarray  # int64 (n,)
    scores: np.ndarray  # float32 (n,)
    anchors: np.ndarray  # int64 (n,)

    @classmethod
    def empty(cls) -> SourceList:
        return cls(np.empty(0, np.int64), np.empty(0, np.float32), np.empty(0, np.int64))

    def __len__(self) -> int:
        return int(self.items.shape[0])


@dataclass(frozen=True)
class Context:
    """Everything the chain knows about the user, fetched once per request."""

    query: Query
    row: int | None  # the user's row in the bundle, None for a user it never saw
    numeric: np.ndarray  # float32 USER_NUMERIC_FEATURES
    history: SourceList  # purchase history, best recency-weighted score first; anchors are the items themselves
    session: np.ndarray  # int64 catalog indices of the recent events, newest first, distinct
    viewed_only: frozenset[int]  # session items that were only viewed
    exclude: np.ndarray  # int64 catalog indices never to show
    problem: str | None = None  # why the features are not the live ones (feature_store_unavailable | _empty)
    country: str = ""  # user_country as the store gave it ("" for a user it does not know): drift counts it


@dataclass(frozen=True)
class Candidates:
    """The merged candidate set: items, and per source (columns in SOURCES order) score, 1-based rank and anchor;
    NaN (anchor -1) where that source did not propose the item."""

    items: np.ndarray  # int64 (n,), ascending
    scores: np.ndarray  # float32 (n, len(SOURCES))
    ranks: np.ndarray  # float32 (n, len(SOURCES))
    anchors: np.ndarray  # int64 (n, len(SOURCES))

    def __len__(self) -> int:
        return int(self.items.shape[0])

    def proposed_by(self, j: int) -> tuple[str, ...]:
        return tuple(s for c, s in enumerate(SOURCES) if not np.isnan(self.ranks[j, c]))

    def take(self, keep: np.ndarray) -> Candidates:
        return Candidates(self.items[keep], self.scores[keep], self.ranks[keep], self.anchors[keep])


@dataclass(frozen=True)
class Scored:
    """Candidates with one score each, higher is better; `scorer` is "blend" or the single source that ranked."""

    candidates: Candidates
    scores: np.ndarray  # float (n,)
    scorer: str
    ui_times_bought: np.ndarray  # float (n,): how often the user bought each candidate, for the reasons


@dataclass(frozen=True)
class Item:
    item_id: str
    description: str
    score: float
    sources: tuple[str, ...]
    reason: str


@dataclass
class Recommendation:
    user_id: str
    model_version: str
    items: list[Item]
    degraded: bool = False
    fallback_reason: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    candidates: int = 0
    arm: str = "champion"  # the rollout arm that answered (chain/rollout.py)
