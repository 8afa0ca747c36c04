"""The canary guard: automatic rollback of a canary arm that is slower, failing or degraded next to the champion.

Each replica compares the arms it served over the guard's sliding window (chain/rollout.Rollout.check). The first
replica to find a canary worse records the verdict in Redis, under the experiment's digest (RolloutSpec.digest),
and rolls it back; the others read the record on their next check and follow, and a replica that restarts reads it
before its first check. So the whole application backs out within about one `Guard.check_s` of the first verdict,
the event is logged and counted once (`recserve_rollbacks`), and it outlives any replica. A new rollout (another
spec) starts with no rollback.

When Redis does not answer, a replica still rolls back on its own verdict: backing out is the safe side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
        self.project = settings.project
        self._settings = settings
        self._client = client

    @property
    def client(self) -> redis.Redis:
        if self._client is None:  # made on first use: no connection from a constructor
            self._client = redis_client(self._settings)
        return self._client

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


class CanaryGuard:
    """Runs the guard's checks in a replica (see the module)."""

    def __init__(self, rollout: Rollout, ledger: RollbackLedger, recorder: Any) -> None:
        self.rollout = rollout
        self.ledger = ledger
        self.recorder = recorder

    async def check(self) -> list[str]:
        """One round: this replica's verdicts, shared through the ledger, and the ledger's applied. The arms this
        replica rolled back in this round."""
        spec = self.rollout.arms.spec
        if not any(a.role == "canary" for a in spec.arms):
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
        for arm in spec.users_arms:
            self.recorder.share(arm.name, self.rollout.arms.weight(arm))
        return new

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.check()
            except Exception:  # the guard must outlive a bad round; the arms keep serving
                log.exception("canary guard: a check failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.rollout.arms.spec.guard.check_s)
