"""Rollouts: several bundles served side by side as arms, each user sticky to one arm.

A rollout is configuration (the Ingress's `user_config["rollout"]`): a champion, optional challengers or a canary,
each with a bundle and a weight in percent of users, and one salt for the experiment. A user's arm is a pure
function of (salt, user id), so it is the same on every replica and across restarts, and a new salt re-draws every
user independently of the last experiment (the randomization unit is the user; Kohavi, Tang & Xu, "Trustworthy
Online Controlled Experiments", 2020, ch. 14).

`Arms` is what a replica serves from: the spec and one loaded chain per bundle, swapped as a whole (one attribute
assignment), so a request sees either the old arms or the new ones, never half of each.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from chain.knobs import Knobs
from chain.types import Query, Recommendation
from models.errors import ConfigError

if TYPE_CHECKING:
    from chain.recommend import Chain

log = logging.getLogger("recserve")

Role = Literal["champion", "challenger", "canary", "shadow"]
ARM_NAME = r"^[a-z][a-z0-9_-]{0,31}$"
C = TypeVar("C")


class ArmSpec(BaseModel):
    """One arm: who it serves (a weight, in percent of users) and with what (a bundle)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=ARM_NAME, description="the arm's label in answers and metrics, e.g. champion, canary")
    bundle: str = Field(
        min_length=1,
        description="bundle directory (relative paths resolve from the artifacts root) or URI (s3://.../<version>/)",
    )
    weight: float = Field(
        ge=0, le=100, description="percent of users assigned to this arm; a shadow's: percent of requests mirrored"
    )
    role: Role = "challenger"
    knobs: dict[str, Any] | None = Field(
        None,
        description="knobs that differ for this arm only (e.g. a drill's chaos on the canary), over the Ingress's",
    )

    @field_validator("knobs")
    @classmethod
    def _known_knobs(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value:
            Knobs.model_validate(value)  # names and ranges checked now, not when the arm loads
        return value or None

    @property
    def key(self) -> str:
        """What a loaded chain is kept under: the bundle, and the arm's own knobs when it has any (two arms with
        different knobs need two chains, which share one loaded bundle). A shadow's chain is its own too: it
        records no stage metrics."""
        own = json.dumps(self.knobs, sort_keys=True) if self.knobs else ""
        if self.role == "shadow":
            return f"{self.bundle}#{own}#shadow"
        return f"{self.bundle}#{own}" if own else self.bundle


class Guard(BaseModel):
    """Automatic rollback of a canary: each replica compares every canary arm with the champion over a sliding
    window, and rolls the canary back (its users to the champion) when it is worse by more than a margin on one
    of: p99 latency, error rate, degraded share, for `consecutive` checks in a row with at least `min_answers` on
    both arms in the window. The first replica to decide records it in Redis; the others follow within a check."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    window_s: float = Field(30.0, gt=0, le=3600, description="the sliding window compared, s")
    check_s: float = Field(2.0, gt=0, le=600, description="how often each replica compares, s")
    min_answers: int = Field(100, ge=1, description="answers each arm needs in the window before any verdict")
    consecutive: int = Field(2, ge=1, le=100, description="checks in a row that must find the canary worse")
    p99_margin_ms: float = Field(25.0, ge=0, description="the canary's p99 may exceed the champion's by this, ms")
    error_margin: float = Field(0.01, ge=0, le=1, description="... its error rate by this (a share, 0-1)")
    degraded_margin: float = Field(0.05, ge=0, le=1, description="... its degraded share by this (0-1)")


class ShadowLimits(BaseModel):
    """Shadow requests run after the caller's answer, one at a time, and only while the replica is nearly idle:
    they are the first work shed under load."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    queue: int = Field(32, ge=1, le=10_000, description="shadow requests waiting; past this, new ones are shed")
    max_in_flight: int = Field(
        1, ge=0, le=10_000, description="a shadow request starts only while at most this many callers' are in flight"
    )


class RolloutSpec(BaseModel):
    """The arms of one experiment. Weights are percent of users and sum to 100; exactly one arm is the champion
    (the model a rollback returns every user to)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    salt: str = Field("default", min_length=1, max_length=64, description="one per experiment: a new salt re-draws")
    arms: tuple[ArmSpec, ...] = Field(min_length=1, max_length=8)
    guard: Guard = Field(default_factory=Guard, description="automatic rollback of canary arms")
    shadow_limits: ShadowLimits = Field(default_factory=ShadowLimits)

    @model_validator(mode="after")
    def _consistent(self) -> RolloutSpec:
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be unique, got {names}: rename the repeated one")
        champions = [a.name for a in self.arms if a.role == "champion"]
        if len(champions) != 1:
            raise ValueError(f"exactly one arm must have role champion, got {champions or 'none'}: mark one")
        shadows = [a.name for a in self.arms if a.role == "shadow"]
        if len(shadows) > 1:
            raise ValueError(f"at most one arm may be the shadow, got {shadows}: keep one")
        total = sum(a.weight for a in self.users_arms)
        if abs(total - 100.0) > 1e-6:
            raise ValueError(
                f"the weights of the arms that serve users sum to {total:g}, not 100: make them percentages of all "
                "users (a shadow's weight is the percent of requests it mirrors, and is not counted)"
            )
        return self

    @property
    def champion(self) -> ArmSpec:
        return next(a for a in self.arms if a.role == "champion")

    @property
    def users_arms(self) -> tuple[ArmSpec, ...]:
        """The arms users are assigned to: all but the shadow."""
        return tuple(a for a in self.arms if a.role != "shadow")

    @property
    def shadow(self) -> ArmSpec | None:
        return next((a for a in self.arms if a.role == "shadow" and a.weight > 0), None)

    @property
    def digest(self) -> str:
        """Names this exact experiment (arms, weights, knobs, salt) in shared state, e.g. a rollback's record."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]

    @classmethod
    def single(cls, bundle: str) -> RolloutSpec:
        """No experiment: every user on one champion."""
        return cls(arms=(ArmSpec(name="champion", bundle=bundle, weight=100.0, role="champion"),))


def bucket(user_id: str, salt: str) -> float:
    """The user's place in [0, 1) for this salt: the first 8 bytes of sha256(salt, user id), uniform and
    independent across salts. Deterministic, so every replica agrees without sharing state."""
    digest = hashlib.sha256(f"{salt}\x1f{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign(user_id: str, spec: RolloutSpec) -> ArmSpec:
    """The arm whose cumulative weight range holds the user's bucket (arms in the spec's order)."""
    point = bucket(user_id, spec.salt) * 100.0
    upto = 0.0
    live = [a for a in spec.users_arms if a.weight > 0]
    for arm in live:
        upto += arm.weight
        if point < upto:
            return arm
    return live[-1]  # float rounding at the top of the range


@dataclass(frozen=True)
class Arms(Generic[C]):
    """The arms a replica serves: the spec, a loaded chain per arm key (ArmSpec.key; arms may share one), and the
    canary arms rolled back (name -> why), whose users the champion serves."""

    spec: RolloutSpec
    chains: Mapping[str, C]  # ArmSpec.key -> its chain
    rolled_back: Mapping[str, str] = field(default_factory=dict)

    def pick(self, user_id: str, forced: str | None = None) -> tuple[ArmSpec, C]:
        """The user's arm and its chain; `forced` names an arm outright (testing; the edge checks who may)."""
        if forced is not None:
            arm = next((a for a in self.spec.arms if a.name == forced), None)
            if arm is None:
                raise KeyError(forced)
        else:
            arm = assign(user_id, self.spec)
            if arm.name in self.rolled_back:
                arm = self.spec.champion
        return arm, self.chains[arm.key]

    @property
    def champion(self) -> C:
        return self.chains[self.spec.champion.key]

    def by_bundle(self) -> dict[str, C]:
        """A loaded chain per bundle (an arm's own chains share their bundle's models and data)."""
        return {a.bundle: self.chains[a.key] for a in self.spec.arms}

    def weight(self, arm: ArmSpec) -> float:
        """The arm's share now: a rolled-back canary's users are the champion's (a shadow's: of requests)."""
        if arm.name in self.rolled_back:
            return 0.0
        if arm.role == "champion":
            return arm.weight + sum(a.weight for a in self.spec.users_arms if a.name in self.rolled_back)
        return arm.weight


@dataclass(frozen=True)
class SwitchState:
    """Where the replica stands with the rollout it was last given."""

    target: RolloutSpec  # the spec asked for
    serving: RolloutSpec  # the spec answering now
    error: str | None = None  # why the last switch failed, if it did (the old arms kept serving)

    @property
    def done(self) -> bool:
        return self.target == self.serving


@dataclass(frozen=True)
class WindowStats:
    """One arm's answers over the guard's window: how many, p99 latency (ms), error rate and degraded share."""

    answers: int
    p99_ms: float
    error_rate: float
    degraded_share: float


class ArmWindow:
    """An arm's recent answers as (time s, latency ms, degraded, error), oldest first, bounded in memory."""

    def __init__(self, maxlen: int = 50_000) -> None:
        self._rows: deque[tuple[float, float, bool, bool]] = deque(maxlen=maxlen)

    def add(self, now: float, ms: float, degraded: bool, error: bool) -> None:
        self._rows.append((now, ms, degraded, error))

    def stats(self, now: float, window_s: float) -> WindowStats:
        while self._rows and self._rows[0][0] < now - window_s:
            self._rows.popleft()
        if not self._rows:
            return WindowStats(0, float("nan"), float("nan"), float("nan"))
        rows = np.array([r[1:] for r in self._rows], dtype=np.float64)
        return WindowStats(
            len(rows), float(np.percentile(rows[:, 0], 99)), float(rows[:, 2].mean()), float(rows[:, 1].mean())
        )


def verdict(canary: WindowStats, champion: WindowStats, guard: Guard) -> str | None:
    """Why the canary is worse than the champion by more than the guard's margins, or None (also while either arm
    has fewer than `min_answers` in the window: no verdict on too little)."""
    if min(canary.answers, champion.answers) < guard.min_answers:
        return None
    if canary.error_rate > champion.error_rate + guard.error_margin:
        return f"error rate {canary.error_rate:.1%} vs the champion's {champion.error_rate:.1%}"
    if canary.degraded_share > champion.degraded_share + guard.degraded_margin:
        return f"degraded share {canary.degraded_share:.1%} vs the champion's {champion.degraded_share:.1%}"
    if canary.p99_ms > champion.p99_ms + guard.p99_margin_ms:
        return f"p99 {canary.p99_ms:.1f} ms vs the champion's {champion.p99_ms:.1f} ms"
    return None


@asynccontextmanager
async def _no_wait() -> AsyncIterator[float]:
    yield 0.0


def agreement(primary: list[str], other: list[str], k: int = 10) -> tuple[float, float | None]:
    """How much two rankings agree: overlap@k (|top-k of each, in common| / k) and Kendall's tau-b between the
    ranks the common items hold in each list (scipy.stats.kendalltau; None with fewer than two in common, or when
    a list holds one rank only)."""
    from scipy.stats import kendalltau  # scipy's import is slow; only shadow work needs it

    a, b = primary[:k], other[:k]
    where = {x: i for i, x in enumerate(b)}
    common = [x for x in a if x in where]
    overlap = len(common) / k
    if len(common) < 2:
        return overlap, None
    tau = kendalltau(range(len(common)), [where[x] for x in common]).statistic
    return overlap, None if np.isnan(tau) else float(tau)


class Rollout:
    """A replica's arms, and the switch between one set and the next without a pause.

    `apply(spec)` returns at once. In the background, each bundle the new spec names that is not loaded yet is
    loaded by `load` (off the event loop), given the current knobs and warmed on every path; then the arms are
    swapped in one assignment. A chain the new arms no longer use is released once its last in-flight request
    finishes, so a switch from one bundle to another holds both only while the new one loads and the old one
    drains. A newer spec given while a switch runs replaces the one waiting; switches run one at a time.

    A shadow arm answers a share of requests again, after the caller has had the answer and only while the replica
    is nearly idle (`ShadowLimits`); its answer goes nowhere but into `recorder.shadow` (overlap@10 and Kendall's
    tau against what the caller got). `check()` is the canary guard's comparison (`Guard`); `roll_back` applies
    its verdict.

    `key(bundle)` names a bundle as the spec may write it in several ways (relative or absolute): the same key,
    the same chain. `turn()` is held while a bundle loads and warms: the application's replicas take turns
    (pipeline/serve/guard.LoadTurns), so they are never all loading at once. A switch that readies any chain first
    waits `settle_s` seconds, once: the platform's own work for the change (Serve's one-replica-at-a-time config
    update, HAProxy's reloads; pipeline/serve/guard.py) passes before the loads take the CPU."""

    def __init__(
        self,
        chain: Chain,
        bundle: str,
        load: Callable[[str], Awaitable[Chain]] | None = None,
        key: Callable[[str], str] = str,
        turn: Callable[[], AbstractAsyncContextManager[Any]] | None = None,
        settle_s: float = 0.0,
    ) -> None:
        self.load, self.bundle_key = load, key
        self.settle_s = settle_s
        self._turn = turn or _no_wait
        spec = RolloutSpec.single(key(bundle))
        self.arms: Arms[Chain] = Arms(spec, {spec.champion.key: chain})
        self.knobs = chain.knobs
        self.state = SwitchState(spec, spec)
        self._in_flight: dict[int, int] = {}
        self._waiting: RolloutSpec | None = None
        self._task: asyncio.Task | None = None
        self._windows: dict[str, ArmWindow] = {}
        self._worse: dict[str, int] = {}  # canary -> checks in a row that found it worse
        self._shadow_queue: asyncio.Queue[tuple[Query, Recommendation, Chain]] | None = None
        self._shadow_task: asyncio.Task | None = None

    @property
    def champion(self) -> Chain:
        return self.arms.champion

    def chains(self) -> list[Chain]:
        return list(self.arms.chains.values())

    def in_flight(self) -> int:
        return sum(self._in_flight.values())

    @contextmanager
    def using(self, chain: Chain) -> Iterator[Chain]:
        """Counts a request on `chain`, so a switch releases the chain only after the request is done."""
        self._in_flight[id(chain)] = self._in_flight.get(id(chain), 0) + 1
        try:
            yield chain
        finally:
            self._in_flight[id(chain)] -= 1

    async def recommend(self, q: Query, forced: str | None = None) -> Recommendation:
        """The answer of the user's arm (or of `forced`, an arm's name), labelled with the arm."""
        arms = self.arms
        try:
            arm, chain = arms.pick(q.user_id, forced)
        except KeyError:
            names = ", ".join(a.name for a in arms.spec.arms)
            raise ConfigError(f"no arm {forced!r} in the running rollout: name one of {names}") from None
        started = time.perf_counter()
        try:
            with self.using(chain):
                rec = await chain.recommend(q)
        except Exception:
            self._observe(arm.name, chain.core.version, started, degraded=True, error=True, candidates=0)
            raise
        error = "internal_error" in (rec.fallback_reason or "")
        self._observe(arm.name, rec.model_version, started, rec.degraded, error, rec.candidates)
        shadow = arms.spec.shadow
        if shadow is not None and forced is None and random.random() * 100.0 < shadow.weight:
            self._offer_shadow(q, rec, arms.chains[shadow.key], arms.spec.shadow_limits)
        return replace(rec, arm=arm.name)

    def _observe(self, arm: str, version: str, started: float, degraded: bool, error: bool, candidates: int) -> None:
        ms = (time.perf_counter() - started) * 1000
        self.champion.recorder.answer(arm, version, ms, degraded, error=error, candidates=candidates)
        self._windows.setdefault(arm, ArmWindow()).add(time.monotonic(), ms, degraded, error)

    def _offer_shadow(self, q: Query, primary: Recommendation, chain: Chain, limits: ShadowLimits) -> None:
        if self._shadow_queue is None or self._shadow_queue.maxsize != limits.queue:
            self._shadow_queue = asyncio.Queue(limits.queue)
            if self._shadow_task is not None:
                self._shadow_task.cancel()
            self._shadow_task = asyncio.get_running_loop().create_task(self._shadows(self._shadow_queue))
        try:
            self._shadow_queue.put_nowait((q, primary, chain))
        except asyncio.QueueFull:
            self.champion.recorder.shadow("shed", float("nan"), None, None)

    async def _shadows(self, queue: asyncio.Queue[tuple[Query, Recommendation, Chain]]) -> None:
        """The shadow worker: one request at a time, after the callers' (it yields first, so the answer that
        offered the work goes out before it starts), shed while callers are in flight."""
        while True:
            q, primary, chain = await queue.get()
            await asyncio.sleep(0)
            recorder = self.champion.recorder
            if self.in_flight() > self.arms.spec.shadow_limits.max_in_flight:
                recorder.shadow("shed", float("nan"), None, None)
                continue
            started = time.perf_counter()
            try:
                with self.using(chain):
                    rec = await chain.recommend(q)
            except Exception:
                log.exception("shadow request for user %s failed", q.user_id)
                recorder.shadow("error", (time.perf_counter() - started) * 1000, None, None)
                continue
            overlap, tau = agreement([i.item_id for i in primary.items], [i.item_id for i in rec.items])
            outcome = "degraded" if rec.degraded else "answered"
            recorder.shadow(outcome, (time.perf_counter() - started) * 1000, overlap, tau)

    def check(self, now: float | None = None) -> dict[str, str]:
        """The guard's comparison, once: canary arms found worse than the champion on `consecutive` checks in a
        row (name -> why). Does not roll back: `roll_back` does, once the verdict is shared."""
        spec, now = self.arms.spec, time.monotonic() if now is None else now
        guard = spec.guard
        if not guard.enabled:
            return {}
        champion = self._windows.get(spec.champion.name, ArmWindow()).stats(now, guard.window_s)
        found: dict[str, str] = {}
        for arm in spec.arms:
            if arm.role != "canary" or arm.name in self.arms.rolled_back:
                continue
            why = verdict(self._windows.get(arm.name, ArmWindow()).stats(now, guard.window_s), champion, guard)
            self._worse[arm.name] = self._worse.get(arm.name, 0) + 1 if why else 0
            if why and self._worse[arm.name] >= guard.consecutive:
                found[arm.name] = f"{why}, over the last {guard.window_s:g} s"
        return found

    def roll_back(self, rolled_back: Mapping[str, str]) -> list[str]:
        """Serves these canary arms' users from the champion (name -> why); the arms newly rolled back."""
        canaries = {a.name for a in self.arms.spec.arms if a.role == "canary"}
        new = {n: why for n, why in rolled_back.items() if n in canaries and n not in self.arms.rolled_back}
        if new:
            self.arms = replace(self.arms, rolled_back={**self.arms.rolled_back, **new})
            for name, why in new.items():
                log.warning("rollout: canary %r rolled back, its users to the champion: %s", name, why)
        return list(new)

    def reconfigure(self, knobs: Knobs) -> None:
        self.knobs = knobs
        for arm in self.arms.spec.arms:
            self.arms.chains[arm.key].reconfigure(self._knobs(arm))

    def _knobs(self, arm: ArmSpec) -> Knobs:
        if not arm.knobs:
            return self.knobs
        return Knobs.model_validate({**self.knobs.model_dump(exclude_unset=True), **arm.knobs})

    def normalized(self, spec: RolloutSpec) -> RolloutSpec:
        return spec.model_copy(
            update={"arms": tuple(a.model_copy(update={"bundle": self.bundle_key(a.bundle)}) for a in spec.arms)}
        )

    def apply(self, spec: RolloutSpec) -> None:
        """Start switching to `spec` (see the class). Raises ConfigError when this replica cannot load bundles."""
        spec = self.normalized(spec)
        if spec == self.state.target:
            return
        new = {a.bundle for a in spec.arms} - set(self.arms.by_bundle())
        if new and self.load is None:
            raise ConfigError(
                f"this replica cannot load other bundles ({', '.join(sorted(new))}): it was built without a bundle "
                "loader (pipeline/serve/local.make_api gives one); deploy the bundle as the application's instead"
            )
        self.state = replace(self.state, target=spec, error=None)
        self._waiting = spec
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self._waiting is not None:
            spec, self._waiting = self._waiting, None
            try:
                await self._switch(spec)
            except Exception as exc:  # the old arms keep serving; the state says why
                log.exception("rollout switch to %s failed; the current arms keep serving", spec)
                # Done, failed: the target is what serves, so /readyz says "failed" and the same spec may be retried.
                self.state = replace(self.state, target=self.state.serving, error=f"{type(exc).__name__}: {exc}")

    async def _switch(self, spec: RolloutSpec) -> None:
        chains: dict[str, Chain] = {}
        bundles = self.arms.by_bundle()
        if self.settle_s > 0 and any(arm.key not in self.arms.chains for arm in spec.arms):
            await asyncio.sleep(self.settle_s)
        for arm in spec.arms:
            if arm.key in chains:
                continue
            chain = self.arms.chains.get(arm.key)
            if chain is None:
                async with self._turn() as waited:
                    started = time.monotonic()
                    base = bundles.get(arm.bundle)
                    if base is None:
                        assert self.load is not None  # apply() refused this replica otherwise
                        base = bundles[arm.bundle] = await self.load(arm.bundle)
                        fresh = base
                    else:  # the bundle is loaded: a chain of its own over it (its knobs, breakers, recorder)
                        fresh = base.twin()
                    if arm.role == "shadow":
                        fresh = fresh.twin(quiet=True)
                    fresh.reconfigure(self._knobs(arm))
                    await fresh.warm()
                log.info(
                    "rollout: readied %s for arm %s in %.1f s, after %.1f s waiting for the load turn",
                    arm.bundle,
                    arm.name,
                    time.monotonic() - started,
                    waited,
                )
                chain = fresh
            else:
                chain.reconfigure(self._knobs(arm))
            chains[arm.key] = chain
        old = self.arms
        self.arms = Arms(spec, chains)  # a rollback belongs to its experiment: a new spec starts afresh
        self._worse.clear()
        self.state = replace(self.state, serving=spec)
        log.info("rollout: now serving %s", [(a.name, a.weight, a.bundle) for a in spec.arms])
        for key, chain in old.chains.items():
            if key not in chains:
                while self._in_flight.get(id(chain), 0) > 0:
                    await asyncio.sleep(0.01)
                self._in_flight.pop(id(chain), None)
                log.info("rollout: released %s", key)
        del old

    async def wait(self, timeout_s: float = 120.0) -> SwitchState:
        """Until the switch in progress (if any) is done; the state then."""
        if self._task is not None:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        return self.state
