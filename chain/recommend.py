"""The chain per request, under one deadline with one fallback ladder:

    ctx = fetch(query)                      # the user's features; the bundle's when the store cannot answer
    lists = retrieve(ctx)                   # CF and content in parallel (stages), history, popularity
    cands = filter(merge(lists))            # excluded items out; with a query, only its matches stay
    scored = score(hydrate(cands, ctx))     # the blender, or the single-source rung when it is out
    answer = explain(order(scored, k))      # one ranking, one item per description, with reasons

Every failure below the HTTP edge ends in a ranked answer flagged `degraded`, with the reason: a stage that errs or
misses its share of the deadline is skipped (and, after `breaker_failures` in a row, not called for
`breaker_open_s`, then probed in the background: chain/breaker.py); a failure anywhere else answers the popularity
ranking (`internal_error`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import numpy as np

from chain.breaker import Breaker
from chain.context import ContextFetcher
from chain.drift import DriftMonitor
from chain.explain import POPULAR_REASON, explain
from chain.hydrate import hydrate
from chain.knobs import Knobs
from chain.merge import filter_candidates, merge
from chain.order import order
from chain.ports import FeatureStore, NullRecorder, Recorder, Stages
from chain.retrieve import CFQuery, ContentQuery, cf_query, content_query, popular
from chain.runtimes import ChaosStages
from chain.score import single_source
from chain.spans import span
from chain.types import Candidates, Context, Item, Query, Recommendation, Scored, SourceList
from models.bundle import ServingCore
from models.settings import TrainSettings
from models.snapshot import Snapshot

T = TypeVar("T")
log = logging.getLogger("recserve")


class Sizes:
    """How many candidates each source proposes for one request: the bundle's training settings unless a knob
    overrides them. Popularity and the query's matches always cover 2k items past the excluded ones, so an answer
    holds k items, all scored by the same scorer, whenever the catalog allows."""

    def __init__(self, settings: TrainSettings, n_items: int, knobs: Knobs) -> None:
        c = settings.candidates
        self.n_cf = knobs.n_cf or c.n_cf
        self.n_content = knobs.n_content or c.n_content
        self.n_history = knobs.n_history or c.n_history
        self.n_popular = knobs.n_popular or c.n_popular
        self.n_query = knobs.n_query
        self.profile_items = settings.content.profile_items
        self.n_items = n_items

    def covering(self, n: int, q: Query) -> int:
        return min(self.n_items, max(n, 2 * q.k + len(q.exclude)))


def retrieve_plan(ctx: Context, snapshot: Snapshot, sizes: Sizes) -> tuple[CFQuery, ContentQuery]:
    """The CF and content queries for one context (the same for serving and offline)."""
    q = ctx.query
    return (
        cf_query(ctx, snapshot, sizes.n_cf),
        content_query(ctx, sizes.n_content, sizes.covering(sizes.n_query, q), sizes.profile_items),
    )


def candidates(
    ctx: Context, cf: SourceList | None, content: SourceList | None, popularity: SourceList
) -> tuple[dict[str, SourceList], Candidates]:
    """Merge and filter, the same for serving and offline: every source that proposed something, merged; the
    excluded items out; with a query (and content's answer to it), only the query's matches."""
    lists = {"history": ctx.history, "popularity": popularity}
    if cf is not None and len(cf):
        lists["cf"] = cf
    if content is not None and len(content):
        lists["content"] = content
    query_mode = bool(ctx.query.query) and "content" in lists
    return lists, filter_candidates(merge(lists), ctx.exclude, query_mode)


class Chain:
    def __init__(
        self,
        core: ServingCore,
        store: FeatureStore,
        stages: Stages,
        knobs: Knobs,
        recorder: Recorder,
        store_state: Callable[[], str] | None = None,
    ) -> None:
        self.core = core
        self.snapshot = core.snapshot
        self.store = store
        self.fetcher = ContextFetcher(store, core.snapshot, store_state)
        self.stages = ChaosStages(stages)
        self._store_state = store_state
        self._loud = recorder  # what a twin that is not quiet records into, even when this chain is a quiet one
        self.recorder = recorder
        # Per stage: a model replica that died leaves calls hanging to the deadline (about 60 ms each in the
        # distributed app) until Ray replaces it, ~25 s here; skipped, the ladder answers at once.
        self._breakers: dict[str, Breaker] = {}
        # Sees each request's candidates, feature rows and scores (the parity test compares them with offline's).
        self.trace: Callable[[Candidates, np.ndarray, Scored], None] | None = None
        # Drift of the blender's inputs against the bundle's reference (chain/drift.py); off for a bundle without
        # one, and for a quiet chain (a shadow records nothing).
        self.drift = DriftMonitor(core.drift, recorder) if core.drift is not None else None
        self.reconfigure(knobs)

    def twin(self, quiet: bool = False) -> Chain:
        """Another chain over the same loaded bundle, store and stages, with knobs and circuit breakers of its own
        (and, `quiet`, no metrics): an arm whose knobs differ, or a shadow, without loading the bundle twice."""
        recorder = NullRecorder() if quiet else self._loud
        twin = Chain(self.core, self.store, self.stages.inner, self.knobs, recorder, self._store_state)
        twin._loud = self._loud
        if quiet:
            twin.drift = None
        return twin

    def reconfigure(self, knobs: Knobs) -> None:
        self.knobs = knobs
        self.stages.chaos = knobs.chaos
        self.sizes = Sizes(self.core.settings, int(self.snapshot.item_ids.shape[0]), knobs)

    async def _guarded(self, stage: str, call: Callable[[], Awaitable[T]], until: float) -> tuple[T | None, str | None]:
        """The stage's call by `until` behind its circuit breaker (chain/breaker.py): "unavailable" without a call
        while the stage is skipped."""
        k = self.knobs
        breaker = self._breakers.get(stage)
        if breaker is None:  # made once per stage, not on every call
            breaker = self._breakers[stage] = Breaker(stage)
        return await breaker.call(
            call, until, failures=k.breaker_failures, open_s=k.breaker_open_s, probe_s=k.deadline_ms / 1000
        )

    async def recommend(self, q: Query) -> Recommendation:
        try:
            with span("recommend", k=q.k):
                return await self._recommend(q)
        except Exception:
            # Never a 500 for a valid request: the popularity ranking is always there.
            log.exception("recommend failed for user %s; serving popularity", q.user_id)
            self.recorder.fallback("internal_error")
            return self.popular_answer(q, "internal_error")

    async def _recommend(self, q: Query) -> Recommendation:
        started = time.monotonic()
        deadline = self.knobs.deadline_ms / 1000
        timings: dict[str, float] = {}
        reasons: list[str] = []

        def lap(stage: str, since: float) -> float:
            now = time.monotonic()
            timings[stage] = round((now - since) * 1000, 3)
            self.recorder.stage(stage, timings[stage])
            return now

        k = self.knobs
        with span("features"):
            ctx = self.fetcher.fetch(q, self.sizes.n_history, k.session_events, k.feature_store_retry_s)
        if ctx.problem:
            reasons.append(ctx.problem)
        t = lap("features", started)

        cf_q, ct_q = retrieve_plan(ctx, self.snapshot, self.sizes)
        until = started + deadline * k.retrieval_share
        # With a query, content is the source that answers it, and it must first encode the text (17-26 ms of CPU
        # on the reference machine, twice that on two busy cores): it may take until the blender's share.
        until_content = started + deadline * (k.blend_share if q.query else k.retrieval_share)

        async def timed(
            name: str, call: Callable[[], Awaitable[SourceList]], by: float
        ) -> tuple[SourceList | None, str | None]:
            with span(name):
                out = await self._guarded(name, call, by)
                lap(name, t)
            return out

        (cf, cf_err), (ct, ct_err) = await asyncio.gather(
            timed("cf", lambda: self.stages.cf(cf_q), until),
            timed("content", lambda: self.stages.content(ct_q), until_content),
        )
        reasons += [f"{name}_{err}" for name, err in (("cf", cf_err), ("content", ct_err)) if err]
        t = time.monotonic()

        with span("blend"):
            with span("filter"):
                pop = popular(self.core.popularity, self.sizes.covering(self.sizes.n_popular, q))
                _, cands = candidates(ctx, cf, ct, pop)
            self.recorder.candidates(len(cands))
            with span("hydrate", candidates=len(cands)):
                hydrated = hydrate(cands, ctx, self.snapshot, self.store.item_matrix)
            if self.drift is not None:
                self.drift.observe_context(ctx, hydrated.x)
            scores, blend_err = await self._guarded(
                "blend", lambda: self.stages.blend(hydrated.x), started + deadline * k.blend_share
            )
            t = lap("blend", t)
        if blend_err is None and scores is not None:
            scored = Scored(cands, scores, "blend", hydrated.ui_times_bought)
        else:
            reasons.append(f"blend_{blend_err}")
            rung = single_source(cands)
            if rung is None:  # nothing to rank at all: a catalog smaller than what was excluded
                return self.popular_answer(q, ",".join(reasons))
            scored = Scored(cands, rung[0], rung[1], hydrated.ui_times_bought)
        if self.trace is not None:
            self.trace(cands, hydrated.x, scored)
        with span("rules"):  # the order, one item per description, and the reasons
            positions = order(cands.items, scored.scores, q.k, self.snapshot.descriptions)
            items = explain(scored, positions, ctx, self.snapshot)
            lap("rules", t)
        timings["total"] = round((time.monotonic() - started) * 1000, 3)
        for r in reasons:
            self.recorder.fallback(r)
        return Recommendation(
            user_id=q.user_id,
            model_version=self.core.version,
            items=items,
            degraded=bool(reasons),
            fallback_reason=",".join(reasons) or None,
            timings_ms=timings,
            candidates=len(cands),
        )

    def popular_answer(self, q: Query, reason: str) -> Recommendation:
        """The ladder's last rung: the popularity ranking (score = distinct invoices in the last 30 days), without
        the excluded items, one per description."""
        snap, pop = self.snapshot, self.core.popularity
        exclude = [snap.item_index[x] for x in q.exclude if x in snap.item_index]
        ranked = pop.order[~np.isin(pop.order, exclude)]
        # Minus the position as the sort key: `order` keeps popularity's own ranking and drops repeated descriptions.
        shown = ranked[order(ranked, -np.arange(ranked.shape[0], dtype=np.float64), q.k, snap.descriptions)]
        items = [
            Item(
                str(snap.item_ids[i]), str(snap.descriptions[i]), float(pop.scores[i]), ("popularity",), POPULAR_REASON
            )
            for i in shown.tolist()
        ]
        return Recommendation(q.user_id, self.core.version, items, True, reason, {}, 0)

    async def warm(self) -> None:
        """One full request per path before the replica reports ready: the first call through each stage (handle
        routing, lazy imports, caches, the encoder) is slow, and must not land on a customer."""
        if not self.snapshot.user_ids.size:
            return
        user = str(self.snapshot.user_ids[0])
        knobs = self.knobs
        self.knobs = knobs.model_copy(update={"deadline_ms": 10_000.0})
        try:
            for q in (Query(user), Query("warm-up-new-user"), Query(user, query="warm up")):
                await self.recommend(q)
            await self.similar(str(self.snapshot.item_ids[0]), 5)
        finally:
            self.knobs = knobs

    async def similar(self, item_id: str, k: int) -> list[Item] | None:
        """The k items whose descriptions are nearest the item's; None for an item the bundle does not know."""
        i = self.snapshot.item_index.get(item_id)
        if i is None:
            return None
        found = await self.stages.similar(i, k)
        name = str(self.snapshot.descriptions[i]).lower()
        return [
            Item(
                str(self.snapshot.item_ids[j]),
                str(self.snapshot.descriptions[j]),
                float(s),
                ("content",),
                f"similar to {name}",
            )
            for j, s in zip(found.items.tolist(), found.scores.tolist(), strict=True)
        ]
