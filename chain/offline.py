"""The chain over many users at once, synchronously: blender training, evaluation and `recserve replay`.

It calls the same stage objects (CFStage, ContentStage, BlendStage) and the same step functions (fetch, retrieve
plan, merge, filter, hydrate, order, explain) as serving's `Chain`, one user at a time, so what is trained and
evaluated is exactly what serves; only the deadline and the stage fallbacks are serving's own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from chain.context import BundleFeatures, context
from chain.explain import explain
from chain.hydrate import Hydrated, hydrate
from chain.knobs import Knobs
from chain.order import order
from chain.ports import FeatureStore
from chain.recommend import Sizes, candidates, retrieve_plan
from chain.retrieve import CFStage, ContentStage, normalize_query, popular
from chain.score import BlendStage
from chain.types import Candidates, Context, Query, Recommendation, Scored, SourceList
from models.blender import Blender
from models.bundle import ServingCore, load_core
from models.cf import ALSModel
from models.content import ContentModel
from models.popularity import Popularity
from models.settings import TrainSettings
from models.snapshot import Snapshot


@dataclass(frozen=True)
class Retrieved:
    context: Context
    lists: dict[str, SourceList]
    candidates: Candidates


class OfflineChain:
    def __init__(
        self,
        snapshot: Snapshot,
        popularity: Popularity,
        settings: TrainSettings,
        cf: CFStage,
        content: ContentStage,
        blend: BlendStage | None = None,
        store: FeatureStore | None = None,
        knobs: Knobs | None = None,
        version: str = "offline",
    ) -> None:
        """`store`: where users' features come from (default: the bundle's own, no events)."""
        n_items = len(snapshot.item_ids)
        if cf.model.n_items != n_items or content.model.n_items != n_items:
            raise ValueError(
                f"catalog has {n_items} items but CF has {cf.model.n_items} and content {content.model.n_items}"
            )
        self.snapshot = snapshot
        self.popularity = popularity
        self.settings = settings
        self.cf, self.content, self.blend = cf, content, blend
        self.store = store or BundleFeatures(snapshot)
        self.knobs = knobs or Knobs()
        self.sizes = Sizes(settings, n_items, self.knobs)
        self.version = version

    def retrieve(self, q: Query) -> Retrieved:
        k = self.knobs
        ctx = context(q, self.store.user(q.user_id), self.snapshot, self.sizes.n_history, k.session_events)
        cf_q, ct_q = retrieve_plan(ctx, self.snapshot, self.sizes)
        vector = self.content.encode(normalize_query(ct_q.query)) if ct_q.query else None
        lists, cands = candidates(
            ctx,
            self.cf.retrieve(cf_q),
            self.content.retrieve(ct_q, vector),
            popular(self.popularity, self.sizes.covering(self.sizes.n_popular, q)),
        )
        return Retrieved(ctx, lists, cands)

    def retrieve_all(self, queries: Iterable[Query]) -> Iterable[Retrieved]:
        for q in queries:
            yield self.retrieve(q)

    def hydrate(self, r: Retrieved) -> Hydrated:
        return hydrate(r.candidates, r.context, self.snapshot, self.store.item_matrix)

    def score(self, r: Retrieved) -> Scored:
        if self.blend is None:
            raise ValueError("this chain has no blender: pass one to score")
        h = self.hydrate(r)
        return Scored(r.candidates, self.blend.score(h.x), "blend", h.ui_times_bought)

    def ranking(self, r: Retrieved, k: int) -> tuple[Scored, list[int]]:
        """The blend's k best (catalog indices), as serving orders them."""
        scored = self.score(r)
        positions = order(r.candidates.items, scored.scores, k, self.snapshot.descriptions)
        return scored, r.candidates.items[positions].tolist()

    def recommend(self, q: Query) -> Recommendation:
        r = self.retrieve(q)
        scored = self.score(r)
        positions = order(r.candidates.items, scored.scores, q.k, self.snapshot.descriptions)
        items = explain(scored, positions, r.context, self.snapshot)
        return Recommendation(q.user_id, self.version, items, candidates=len(r.candidates))


def open_offline(
    bundle: Path, store: FeatureStore | None = None, knobs: Knobs | None = None, compile_cache: Path | None = None
) -> OfflineChain:
    """A verified bundle's chain, models in this process (CPU), users' features from `store` or the bundle;
    `compile_cache` is where the blender's compiled trees are kept (default: the temp dir)."""
    core: ServingCore = load_core(bundle)
    path = core.path
    return OfflineChain(
        core.snapshot,
        core.popularity,
        core.settings,
        CFStage(ALSModel.load(path, core.settings.cf)),
        ContentStage(ContentModel.load(path)),
        BlendStage(Blender.load(path, compile_cache=compile_cache)),
        store,
        knobs,
        core.version,
    )
