"""Rollout state the replicas share in Redis: the canary guard's rollbacks, and whose turn it is to load a bundle.

The canary guard: automatic rollback of a canary arm that is slower, failing or degraded next to the champion.

Each replica compares the arms it served over the guard's sliding window (chain/rollout.Rollout.check). The first
replica to find a canary worse records the verdict in Redis, under the experiment's digest (RolloutSpec.digest),
and rolls it back; the others read the record on their next check and follow, and a replica that restarts reads it
before its first check. So the whole application backs out within about one `Guard.check_s` of the first verdict,
the event is logged and counted once (`recserve_rollbacks`), and it outlives any replica. A new rollout (another
spec) starts with no rollback.

When Redis does not answer, a replica still rolls back on its own verdict: backing out is the safe side.

Load turns: in a switch every replica loads the new bundle, and if all do at once, on a small node the whole
application slows at once. `LoadTurns` lets one replica of the application load at a time (a Redis lock, redis-py's
`Lock`: a token per holder, released only by its holder, expiring if the holder dies), so the balancer can move
traffic to the replicas that are not loading. Without Redis, replicas load without waiting.

Before its first load a switch waits `AppArgs.load_settle_s`, once (chain/rollout.Rollout), so that Serve's
one-replica-at-a-time config update and HAProxy's reload for it have passed: a replica that loaded at once did so
while the other was out of the balancer for its update (docs/benchmarks.md, "The switch's tail", third and fourth
passes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import redis

from chain.rollout import Rollout
from pipeline.featurestore.store import REDIS_ERRORS, redis_client
from settings import StoreSettings

log = logging.getLogger("recserve")
RECORD_TTL_S = 30 * 24 * 3600  # an experiment's rollback outlives any replica; a month outlives any experiment


def rollbacks_key(project: str, digest: str) -> str:
    return f"recserve:{project}:rollbacks:{digest}"


class RollbackLedger:
    """The rollbacks of one experiment, shared by the replicas: a Redis hash, arm -> why."""

    def __init__(self, settings: StoreSettings, client: redis.Redis | None = None) -> None:
        """`client`: the replica's Redis client, shared (default: one of its own; it connects on first use)."""
        self.project = settings.project
        self.client = client or redis_client(settings)

    def read(self, digest: str) -> dict[str, str]:
        raw = self.client.hgetall(rollbacks_key(self.project, digest))
        return {k.decode(): v.decode() for k, v in raw.items()}

    def record(self, digest: str, arm: str, why: str) -> bool:
        """Records the verdict unless a replica already has; True when this call did (it counts the event)."""
        key = rollbacks_key(self.project, digest)
        pipe = self.client.pipeline()
        pipe.hsetnx(key, arm, why)
        pipe.expire(key, RECORD_TTL_S)
        first, _ = pipe.execute()
        return bool(first)


def load_turn_key(project: str) -> str:
    return f"recserve:{project}:load-turn"


class LoadTurns:
    """One replica of the application loads a bundle at a time (see the module)."""

    def __init__(self, settings: StoreSettings, hold_s: float = 30.0, client: redis.Redis | None = None) -> None:
        """`hold_s`: the longest one replica may hold the turn (its lock expires then, e.g. if the replica died),
        and the longest another waits for it. `client` as for RollbackLedger."""
        self.key = load_turn_key(settings.project)
        self.client = client or redis_client(settings)
        self.hold_s = hold_s

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[float]:
        """Waits for the application's load turn and holds it; yields the seconds waited."""
        began = time.monotonic()
        lock = None
        try:
            candidate = self.client.lock(
                self.key,
                timeout=self.hold_s,
                sleep=0.05,
                blocking_timeout=self.hold_s,
                thread_local=False,  # taken and given back on different worker threads (asyncio.to_thread)
            )
            if await asyncio.to_thread(candidate.acquire):
                lock = candidate
            else:
                log.warning("rollout: no load turn within %.0f s; loading anyway", self.hold_s)
        except REDIS_ERRORS as exc:
            log.warning("rollout: Redis does not answer (%s); loading without waiting for a turn", exc)
        try:
            yield time.monotonic() - began
        finally:
            if lock is not None:
                with contextlib.suppress(*REDIS_ERRORS, redis.exceptions.LockError):  # expired: nothing to release
                    await asyncio.to_thread(lock.release)


class CanaryGuard:
    """Runs the guard's checks in a replica (see the module)."""

    def __init__(self, rollout: Rollout, ledger: RollbackLedger, recorder: Any) -> None:
        self.rollout = rollout
        self.ledger = ledger
        self.recorder = recorder
        self._shown: set[str] = set()  # arms whose share this replica has exported

    def report_shares(self) -> None:
        """Each arm's share of users now (recserve_arm_share), every round and with or without a canary, so the
        rollout's state is always on the dashboard; an arm that left the experiment goes to 0."""
        arms = self.rollout.arms
        now = {arm.name: arms.weight(arm) for arm in arms.spec.users_arms}
        for name in self._shown - now.keys():
            self.recorder.share(name, 0.0)
        for name, percent in now.items():
            self.recorder.share(name, percent)
        self._shown |= now.keys()

    async def check(self) -> list[str]:
        """One round: this replica's verdicts, shared through the ledger, and the ledger's applied. The arms this
        replica rolled back in this round."""
        spec = self.rollout.arms.spec
        if not any(a.role == "canary" for a in spec.arms):
            self.report_shares()
            return []
        found = self.rollout.check()
        try:
            shared = await asyncio.to_thread(self.ledger.read, spec.digest)
            for arm, why in found.items():
                if arm not in shared and await asyncio.to_thread(self.ledger.record, spec.digest, arm, why):
                    shared[arm] = why
                    self.recorder.rollback(arm, why.partition(" ")[0])
        except REDIS_ERRORS as exc:
            log.warning("canary guard: Redis does not answer (%s); rolling back on this replica's verdict alone", exc)
            shared = found
            for arm, why in found.items():
                self.recorder.rollback(arm, why.partition(" ")[0])
        if self.rollout.arms.spec is not spec:  # a switch landed meanwhile: these verdicts were about the old arms
            return []
        new = self.rollout.roll_back(shared)
        self.report_shares()
        return new

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.check()
            except Exception:  # the guard must outlive a bad round; the arms keep serving
                log.exception("canary guard: a check failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.rollout.arms.spec.guard.check_s)
