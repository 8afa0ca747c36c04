"""The recsys chain over one snapshot: retrieve from four sources, merge, hydrate features, score, order.

Training, evaluation and serving all go through `retrieve` and `hydrate`, for one user or a batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from models.blender import Blender
from models.cf import ALSModel
from models.content import ContentModel
from models.features import Candidates, assemble, merge_sources
from models.popularity import Popularity
from models.ranking import top_n, top_n_rows
from models.settings import CandidateSettings
from models.snapshot import Snapshot

SourceLists = dict[str, tuple[np.ndarray, np.ndarray]]


@dataclass
class Retrieved:
    user: int
    lists: SourceLists
    candidates: Candidates


class Recommender:
    def __init__(
        self,
        snapshot: Snapshot,
        cf: ALSModel,
        content: ContentModel,
        blender: Blender | None,
        candidates: CandidateSettings,
        profile_items: int,
        popularity: Popularity | None = None,
    ) -> None:
        n_items = len(snapshot.item_ids)
        if cf.n_items != n_items or content.n_items != n_items:
            raise ValueError(f"catalog has {n_items} items but CF has {cf.n_items} and content {content.n_items}")
        self.snapshot = snapshot
        self.cf = cf
        self.content = content
        self.blender = blender
        self.settings = candidates
        self.profile_items = profile_items
        self.popularity = popularity or Popularity.fit(snapshot.item_matrix)
        self._popular = self.popularity.top(candidates.n_popular)

    def history(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        return self.snapshot.history_list(user, self.settings.n_history)

    def content_profile(self, history: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """Taste vector from a user's history list (as `history` returns it: best recency-weighted score first)."""
        items, weights = history
        return self.content.profile(items[: self.profile_items], weights[: self.profile_items])

    def retrieve(self, users: np.ndarray, chunk: int = 512) -> Iterator[Retrieved]:
        """Each user's four ranked source lists and their merged candidates, scored a chunk at a time."""
        s = self.settings
        for lo in range(0, users.shape[0], chunk):
            batch = users[lo : lo + chunk]
            cf_scores = self.cf.score_users(batch)
            cf_top = top_n_rows(cf_scores, s.n_cf)
            hist = [self.history(int(u)) for u in batch]
            profiles = np.stack([self.content_profile(h) for h in hist])
            ct_scores = self.content.score_many(profiles)
            ct_top = top_n_rows(ct_scores, s.n_content)
            for r, u in enumerate(batch):
                lists: SourceLists = {
                    "cf": (cf_top[r], cf_scores[r, cf_top[r]]),
                    "history": hist[r],
                    "popularity": self._popular,
                }
                if hist[r][0].size:
                    lists["content"] = (ct_top[r], ct_scores[r, ct_top[r]])
                yield Retrieved(int(u), lists, merge_sources(lists))

    def hydrate(self, r: Retrieved) -> np.ndarray:
        snap = self.snapshot
        times, last = snap.ui_features(r.user, r.candidates.items)
        return assemble(r.candidates, snap.user_matrix[r.user], snap.item_matrix, times, last)

    def blend(self, r: Retrieved, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.blender is None:
            raise ValueError("this recommender has no blender")
        scores = self.blender.predict(self.hydrate(r))
        order, vals = top_n(scores, k)
        return r.candidates.items[order], vals
