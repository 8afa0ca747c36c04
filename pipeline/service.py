"""The ingress's work for one request, without Ray: read features, retrieve in parallel, merge, hydrate, blend,
apply the business rules, under a deadline with a fallback ladder.

The same class runs in both topologies; only its `Stages` differ: in-process (colocated) or deployment handles
(distributed). Every failure below the HTTP layer ends in a ranked answer, flagged `degraded`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from models.bundle import ServingCore
from models.errors import FeatureStoreError
from models.features import SOURCES, USER_NUMERIC_FEATURES, Candidates, assemble, merge_sources
from models.realtime import Realtime
from models.serving import BlendStage, CFQuery, CFStage, ContentQuery, ContentStage, SourceList, order
from pipeline.store import OnlineFeatures, UserFeatures

T = TypeVar("T")
# When a source is asked to rank alone (the blender failed), the one that ranks best offline goes first.
SINGLE_SOURCE_PRIORITY = ("history", "cf", "content", "popularity")


class Chaos(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: str = Field(pattern="^(cf|content|blend)$")
    mode: str = Field(pattern="^(error|delay)$")
    delay_ms: float = Field(200.0, ge=0)


class Knobs(BaseModel):
    """Runtime knobs: the serve config's user_config; `reconfigure` applies a change without a restart."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    deadline_ms: float = Field(80.0, gt=0, le=10_000, description="the whole request's budget")
    retrieval_share: float = Field(0.5, gt=0, lt=1, description="CF and content must answer within this share")
    blend_share: float = Field(0.85, gt=0, lt=1, description="the blender must answer within this share")
    n_cf: int | None = Field(None, ge=1, le=1000, description="default: the bundle's training setting")
    n_content: int | None = Field(None, ge=1, le=1000)
    n_history: int | None = Field(None, ge=1, le=1000)
    n_popular: int | None = Field(None, ge=1, le=1000)
    session_events: int = Field(20, ge=0, le=1000, description="recent events that steer CF and content")
    feature_store_retry_s: float = Field(1.0, ge=0, description="after a Redis failure, serve from the bundle")
    breaker_failures: int = Field(
        3, ge=1, le=1000, description="a stage that fails or misses its deadline this many times in a row is skipped"
    )
    breaker_open_s: float = Field(
        1.0, ge=0, le=600, description="for this long; then one request tries it again (a circuit breaker)"
    )
    max_in_flight: int = Field(
        32, ge=1, le=100_000, description="past this many requests in the replica, answer 503 + Retry-After at once"
    )
    chaos: Chaos | None = Field(None, description="fault injection for drills: make one stage fail or stall")


class Stages(Protocol):
    async def cf(self, q: CFQuery) -> SourceList: ...
    async def content(self, q: ContentQuery) -> SourceList: ...
    async def blend(self, x: np.ndarray) -> np.ndarray: ...
    async def similar(self, item: int, n: int) -> SourceList: ...


class LocalStages:
    """Colocated: the stages run in this process. With threads=0 they run inline on the event loop: fastest on
    few cores, where worker threads contend for the GIL (p50 doubled at 30 req/s here). With threads > 0 they
    run on a pool, so a stage that stalls past its deadline can be abandoned while the request answers."""

    def __init__(self, cf: CFStage, content: ContentStage, blend: BlendStage, threads: int = 0) -> None:
        self.cf_stage = cf
        self.content_stage = content
        self.blend_stage = blend
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="stage") if threads > 0 else None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self.pool is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def cf(self, q: CFQuery) -> SourceList:
        return await self._run(self.cf_stage.retrieve, q)

    async def content(self, q: ContentQuery) -> SourceList:
        return await self._run(self.content_stage.retrieve, q)

    async def blend(self, x: np.ndarray) -> np.ndarray:
        return await self._run(self.blend_stage.score, x)

    async def similar(self, item: int, n: int) -> SourceList:
        return await self._run(self.content_stage.similar, item, n)


class ChaosStages:
    """Wraps real stages and makes the one named in Knobs.chaos fail or stall: fallback drills in production."""

    def __init__(self, inner: Stages, chaos: Callable[[], Chaos | None]) -> None:
        self.inner = inner
        self.chaos = chaos

    async def _maybe(self, stage: str, call: Callable[[], Awaitable[T]]) -> T:
        c = self.chaos()
        if c is not None and c.stage == stage:
            if c.mode == "error":
                raise RuntimeError(f"chaos: stage {stage} fails on purpose")
            await asyncio.sleep(c.delay_ms / 1000)
        return await call()

    async def cf(self, q: CFQuery) -> SourceList:
        return await self._maybe("cf", lambda: self.inner.cf(q))

    async def content(self, q: ContentQuery) -> SourceList:
        return await self._maybe("content", lambda: self.inner.content(q))

    async def blend(self, x: np.ndarray) -> np.ndarray:
        return await self._maybe("blend", lambda: self.inner.blend(x))

    async def similar(self, item: int, n: int) -> SourceList:
        return await self.inner.similar(item, n)


@dataclass(frozen=True)
class Query:
    user_id: str
    k: int = 10
    exclude: tuple[str, ...] = ()
    query: str | None = None


@dataclass(frozen=True)
class Item:
    item_id: str
    description: str
    score: float
    sources: tuple[str, ...]
    reason: str


@dataclass
class Result:
    user_id: str
    model_version: str
    items: list[Item]
    degraded: bool = False
    fallback_reason: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    candidates: int = 0


class Recorder(Protocol):
    def stage(self, stage: str, ms: float) -> None: ...
    def fallback(self, reason: str) -> None: ...
    def candidates(self, n: int) -> None: ...


def _consume(task: asyncio.Future) -> None:
    """Retrieve an abandoned task's outcome, so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


class RecommendService:
    def __init__(
        self,
        core: ServingCore,
        features: OnlineFeatures,
        stages: Stages,
        knobs: Knobs,
        recorder: Recorder,
        store_state: Callable[[], str] | None = None,
    ) -> None:
        """`store_state()` says what the replica's store watch saw last: "ok", "empty" or "unreachable" (None: no
        watch; a Redis error still flips to the bundle's features for `feature_store_retry_s`)."""
        self.core = core
        self.features = features
        self.store_state = store_state
        self.recorder = recorder
        self.stages = ChaosStages(stages, lambda: self.knobs.chaos)
        self.snapshot = core.snapshot
        self.descriptions = core.snapshot.descriptions
        self.item_index = core.snapshot.item_index
        self._store_down_until = 0.0
        # Per stage: consecutive failures, and until when it is skipped. A model replica that died leaves calls
        # hanging to the deadline (about 60 ms each in the distributed app) until Ray replaces it, ~25 s here;
        # skipped, the ladder answers at once.
        self._failures: dict[str, int] = {}
        self._open_until: dict[str, float] = {}
        self.reconfigure(knobs)

    def reconfigure(self, knobs: Knobs) -> None:
        c = self.core.settings.candidates
        self.knobs = knobs
        self.n_cf = knobs.n_cf or c.n_cf
        self.n_content = knobs.n_content or c.n_content
        self.n_history = knobs.n_history or c.n_history
        self.profile_items = self.core.settings.content.profile_items
        items, scores = self.core.popularity.top(knobs.n_popular or c.n_popular)
        self.popular = SourceList(items, scores.astype(np.float32), np.full(items.shape[0], -1, dtype=np.int64))
        self.fill_items, self.fill_scores = self.core.popularity.top(self.snapshot.item_ids.shape[0])

    @property
    def store_healthy(self) -> bool:
        return time.monotonic() >= self._store_down_until

    def user_features(self, user_id: str) -> tuple[UserFeatures, str | None]:
        """From the store; from the bundle, flagged, when Redis is down (and for a short while after) or when the
        bundle's rows are missing from it (`store_state` says "empty": the events still come from Redis)."""
        state = self.store_state() if self.store_state else "ok"
        live: UserFeatures | None = None
        if state != "unreachable" and self.store_healthy:
            try:
                live = self.features.user(user_id)
            except FeatureStoreError:
                self._store_down_until = time.monotonic() + self.knobs.feature_store_retry_s
        if live is not None and state == "ok":
            return live, None
        u = self.snapshot.user_index.get(user_id)
        values: dict[str, Any] = {} if live is None else live.realtime.columns()
        if u is not None:
            values |= dict(zip(USER_NUMERIC_FEATURES, self.snapshot.user_matrix[u].tolist(), strict=True))
        reason = "feature_store_empty" if live is not None else "feature_store_unavailable"
        return UserFeatures.from_values(user_id, values), reason

    def session_items(self, realtime: Realtime) -> tuple[np.ndarray, set[int]]:
        """Catalog indices of the user's recent events, newest first, distinct; and which were only viewed."""
        seen: dict[int, bool] = {}
        for e in realtime.recent(self.knobs.session_events):
            i = self.item_index.get(e.item_id)
            if i is not None:
                seen[i] = seen.get(i, True) and e.event_type == "view"
        return np.fromiter(seen, dtype=np.int64, count=len(seen)), {i for i, v in seen.items() if v}

    async def _guarded(self, stage: str, call: Callable[[], Awaitable[T]], until: float) -> tuple[T | None, str | None]:
        """`_within` behind a circuit breaker: "unavailable" without a call while the stage is skipped."""
        now = time.monotonic()
        if now < self._open_until.get(stage, 0.0):
            return None, "unavailable"
        out, err = await self._within(call(), until)
        if err is None:
            self._failures[stage] = 0
        else:
            self._failures[stage] = self._failures.get(stage, 0) + 1
            if self._failures[stage] >= self.knobs.breaker_failures:
                self._failures[stage] = 0
                self._open_until[stage] = time.monotonic() + self.knobs.breaker_open_s
        return out, err

    async def _within(self, call: Awaitable[T], until: float) -> tuple[T | None, str | None]:
        """The call's result by `until` (monotonic s), or why not. The deadline is hard: a late call is cancelled
        and left behind, never awaited (asyncio.wait_for waits for the cancellation to finish, and a call to a
        dead replica's handle took seconds to cancel)."""
        task = asyncio.ensure_future(call)
        done, _ = await asyncio.wait({task}, timeout=max(until - time.monotonic(), 0.0))
        if not done:
            task.cancel()
            task.add_done_callback(_consume)
            return None, "timeout"
        if task.exception() is not None:
            return None, "error"
        return task.result(), None

    async def recommend(self, q: Query) -> Result:
        started = time.monotonic()
        deadline = self.knobs.deadline_ms / 1000
        timings: dict[str, float] = {}
        reasons: list[str] = []

        def lap(stage: str, since: float) -> float:
            now = time.monotonic()
            timings[stage] = round((now - since) * 1000, 3)
            self.recorder.stage(stage, timings[stage])
            return now

        user, problem = self.user_features(q.user_id)
        if problem:
            reasons.append(problem)
        t = lap("features", started)
        u = self.snapshot.user_index.get(q.user_id)
        session, viewed_only = self.session_items(user.realtime)
        hist_items, hist_scores = (
            self.snapshot.history_list(u, self.n_history) if u is not None else (np.empty(0, np.int64), np.empty(0))
        )
        times, _ = self.snapshot.ui_features(u, hist_items)
        new_session = session[~np.isin(session, hist_items)]
        cf_q = CFQuery(
            user=u,
            items=np.concatenate([hist_items, new_session]),
            counts=np.concatenate([times, np.ones(new_session.shape[0])]),
            fold_in=session.size > 0,
            n=self.n_cf,
        )
        # The session leads the taste profile: what the user looks at now outweighs what they bought before.
        top_weight = float(hist_scores[0]) if hist_scores.size else 1.0
        ct_q = ContentQuery(
            items=np.concatenate([session, hist_items])[: self.profile_items],
            weights=np.concatenate([np.full(session.shape[0], 2 * top_weight), hist_scores])[: self.profile_items],
            query=q.query,
            n=self.n_content,
        )
        until = started + deadline * self.knobs.retrieval_share
        stage_started = time.monotonic()

        async def timed(name: str, call: Callable[[], Awaitable[SourceList]]) -> tuple[SourceList | None, str | None]:
            out = await self._guarded(name, call, until)
            lap(name, stage_started)
            return out

        (cf, cf_err), (ct, ct_err) = await asyncio.gather(
            timed("cf", lambda: self.stages.cf(cf_q)), timed("content", lambda: self.stages.content(ct_q))
        )
        reasons += [f"{name}_{err}" for name, err in (("cf", cf_err), ("content", ct_err)) if err]
        t = time.monotonic()

        lists: dict[str, SourceList] = {
            "history": SourceList(hist_items, hist_scores, hist_items),
            "popularity": self.popular,
        }
        if cf is not None and len(cf):
            lists["cf"] = cf
        if ct is not None and len(ct):
            lists["content"] = ct
        cands = merge_sources({s: (lists[s].items, lists[s].scores) for s in SOURCES if s in lists})
        self.recorder.candidates(len(cands))
        exclude = {i for i in (self.item_index.get(x) for x in q.exclude) if i is not None}

        times_c, last_c = self.snapshot.ui_features(u, cands.items)
        x = assemble(cands, user.numeric, self.features.item_matrix, times_c, last_c)
        scores, blend_err = await self._guarded(
            "blend", lambda: self.stages.blend(x), started + deadline * self.knobs.blend_share
        )
        t = lap("blend", t)
        if blend_err:
            reasons.append(f"blend_{blend_err}")
            scores = self._single_source_scores(cands, exclude)
            if scores is None:
                reasons.append("popularity_only")
        ranked = order(
            cands.items if scores is not None else np.empty(0, np.int64),
            scores if scores is not None else np.empty(0, np.float32),
            q.k,
            exclude,
            self.fill_items,
            self.fill_scores,
        )
        items = self._explain(ranked.items, ranked.scores, cands, lists, times_c, session, viewed_only, q.query)
        lap("rules", t)
        timings["total"] = round((time.monotonic() - started) * 1000, 3)
        for r in reasons:
            self.recorder.fallback(r)
        return Result(
            user_id=q.user_id,
            model_version=self.core.version,
            items=items,
            degraded=bool(reasons),
            fallback_reason=",".join(reasons) or None,
            timings_ms=timings,
            candidates=len(cands),
        )

    def _single_source_scores(self, cands: Candidates, exclude: set[int]) -> np.ndarray | None:
        """The blender is out: rank by the best single source that proposed anything usable."""
        usable = ~np.isin(cands.items, list(exclude))
        for source in SINGLE_SOURCE_PRIORITY:
            ranks = cands.ranks[:, SOURCES.index(source)]
            if np.any(~np.isnan(ranks) & usable):
                return np.where(np.isnan(ranks), -np.inf, -ranks).astype(np.float32)
        return None

    def _explain(
        self,
        items: list[int],
        scores: list[float],
        cands: Candidates,
        lists: dict[str, SourceList],
        times: np.ndarray,
        session: np.ndarray,
        viewed_only: set[int],
        query: str | None,
    ) -> list[Item]:
        pos = {int(i): p for p, i in enumerate(cands.items)}
        anchor_of = {s: dict(zip(lst.items.tolist(), lst.anchors.tolist(), strict=True)) for s, lst in lists.items()}
        session_set = set(session.tolist())
        out = []
        for item, score in zip(items, scores, strict=True):
            p = pos.get(item)
            ranks = cands.ranks[p] if p is not None else np.full(len(SOURCES), np.nan)
            sources = tuple(s for j, s in enumerate(SOURCES) if not np.isnan(ranks[j])) or ("popularity",)
            best = min(sources, key=lambda s: ranks[SOURCES.index(s)] if s in SOURCES and p is not None else 0)
            anchor = anchor_of.get(best, {}).get(item, -1)
            out.append(
                Item(
                    item_id=str(self.snapshot.item_ids[item]),
                    description=str(self.descriptions[item]),
                    score=float(score) if np.isfinite(score) else 0.0,
                    sources=sources,
                    reason=self._reason(
                        best, anchor, int(times[p]) if p is not None else 0, session_set, viewed_only, query
                    ),
                )
            )
        return out

    def _reason(
        self, source: str, anchor: int, times: int, session: set[int], viewed_only: set[int], query: str | None
    ) -> str:
        name = str(self.descriptions[anchor]).lower() if anchor >= 0 else ""
        if source == "history":
            return f"you bought this {times} times before" if times > 1 else "you bought this before"
        if source == "cf":
            return f"bought together with {name}" if name else "popular with customers like you"
        if source == "content":
            if query:
                return f"matches “{query}”"
            if not name:
                return "like what you browse"
            verb = "viewed" if anchor in viewed_only else ("added" if anchor in session else "bought")
            return f"similar to {name} you {verb}"
        return "popular in the last 30 days"

    async def warm(self) -> None:
        """One full request per path before the replica reports ready: the first call through each stage (handle
        routing, lazy imports, caches) is slow, and must not land on a customer."""
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
        i = self.item_index.get(item_id)
        if i is None:
            return None
        found = await self.stages.similar(i, k)
        name = str(self.descriptions[i]).lower()
        return [
            Item(
                str(self.snapshot.item_ids[j]), str(self.descriptions[j]), float(s), ("content",), f"similar to {name}"
            )
            for j, s in zip(found.items.tolist(), found.scores.tolist(), strict=True)
        ]
