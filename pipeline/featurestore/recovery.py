"""Watching the online store for one replica's bundle, and putting it back by itself after a loss.

Every replica checks, twice a second, that Redis answers and that its bundle's rows are there: the marker key that
`materialize` writes last (`recserve:<project>:materialized:<version>`). A Redis restarted without persistence, or
wiped, has no marker. Until the rows are back the replica says so: `/readyz` answers 503 naming the reason, and
answers use the bundle's own user features, flagged `degraded` with `feature_store_empty`.

Recovery needs no operator: once Redis answers and the marker is missing, exactly one replica (the one that wins a
lock in Redis) rebuilds the users' event windows from the durable event log, then re-materializes the bundle's
batch rows, which writes the marker last; every replica sees it on its next check. `recserve features materialize`
still works by hand and writes the same marker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import redis

from models import bundle as bundle_mod
from pipeline.featurestore.store import (
    REDIS_ERRORS,
    RELEASE_LOCK,
    marker_key,
    materialize,
    open_store,
    persistence,
    redis_client,
)
from settings import StoreSettings

log = logging.getLogger("recserve")

StoreState = Literal["ok", "unreachable", "empty"]


@dataclass(frozen=True)
class StoreStatus:
    state: StoreState
    detail: str
    checked_at: float  # time.monotonic() of the check


class StoreWatch:
    """The online store's state for one bundle, kept current by `run`; `recover` restores a lost store.

    `rebuild_events()` (optional) restores users' event windows from the event log and returns how many users it
    restored; `materialize()` loads the bundle's batch rows and writes the marker. Both block; `run` calls them on
    a worker thread so the replica keeps answering meanwhile."""

    def __init__(
        self,
        settings: StoreSettings,
        version: str,
        materialize: Callable[[], object],
        rebuild_events: Callable[[], int] | None = None,
        interval_s: float = 0.5,
        lock_ttl_s: float = 120.0,
        client: redis.Redis | None = None,
        report: Callable[[StoreState], None] | None = None,
    ) -> None:
        self.settings = settings
        self.version = version
        self.interval_s = interval_s
        self.lock_ttl_s = lock_ttl_s
        self._materialize = materialize
        self._rebuild_events = rebuild_events
        self._report = report
        self.client = client or redis_client(settings)
        self._release = self.client.register_script(RELEASE_LOCK)
        self.status = StoreStatus("ok", "not checked yet", 0.0)
        self.recoveries = 0
        # How Redis keeps its data across a restart (pipeline.featurestore.store.persistence); "none" means a restart
        # loses the batch rows (recovered here) and the unflushed part of the event log.
        self.persistence = "unknown"

    @property
    def marker(self) -> str:
        return marker_key(self.settings.project, self.version)

    def check(self) -> StoreStatus:
        """One round trip: is Redis up, and are this bundle's rows there? Blocks at most the client's timeouts.
        Hands the state to `report` (the replica's feature-store gauge)."""
        status = self._check()
        if self._report is not None:
            self._report(status.state)
        return status

    def _check(self) -> StoreStatus:
        host, port = self.settings.host_port
        now = time.monotonic()
        try:
            present = bool(self.client.exists(self.marker))
        except REDIS_ERRORS as exc:
            self.status = StoreStatus("unreachable", f"Redis at {host}:{port} does not answer ({exc})", now)
            return self.status
        if present:
            if self.status.state != "ok" or self.persistence == "unknown":
                with contextlib.suppress(*REDIS_ERRORS):
                    self.persistence = persistence(self.client)
            self.status = StoreStatus("ok", f"bundle {self.version}'s rows are in Redis at {host}:{port}", now)
        else:
            self.status = StoreStatus(
                "empty",
                f"bundle {self.version}'s rows are missing from Redis at {host}:{port} (restarted without "
                "persistence, or wiped): re-materializing them and rebuilding event windows from the event log",
                now,
            )
        return self.status

    def recover(self) -> bool:
        """Restore the store if this replica wins the recovery lock; False when another replica holds it."""
        lock = f"recserve:{self.settings.project}:recover-lock:{self.version}"
        token = uuid.uuid4().hex
        if not self.client.set(lock, token, nx=True, px=int(self.lock_ttl_s * 1000)):
            return False
        began = time.monotonic()
        try:
            users = self._rebuild_events() if self._rebuild_events else 0
            self._materialize()  # writes the marker last, so every replica flips to ok only when all rows are in
            self.recoveries += 1
            log.warning(
                "feature store recovered for bundle %s in %.1f s (%d users' event windows rebuilt)",
                self.version,
                time.monotonic() - began,
                users,
            )
            return True
        finally:
            with contextlib.suppress(*REDIS_ERRORS):
                self._release(keys=[lock], args=[token])

    async def run(self, stop: asyncio.Event) -> None:
        """Check every `interval_s` until `stop` is set; recover when the rows are missing."""
        while not stop.is_set():
            status = await asyncio.to_thread(self.check)
            if status.state == "empty":
                try:
                    if await asyncio.to_thread(self.recover):
                        await asyncio.to_thread(self.check)
                except Exception:
                    # Redis went away again mid-recovery, or Feast failed: the next round tries again.
                    log.exception("feature store recovery for bundle %s failed; retrying", self.version)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)


def bundle_materializer(settings: StoreSettings, bundle_dir: Path) -> Callable[[], object]:
    """What `recserve features materialize` does for one bundle, as a callable for `StoreWatch`."""

    def run() -> object:
        manifest = bundle_mod.read_manifest(bundle_dir)
        return materialize(open_store(settings), settings, bundle_dir, manifest)

    return run
