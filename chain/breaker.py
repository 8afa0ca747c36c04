"""A circuit breaker per model stage, for calls under a deadline.

closed --(`failures` errors or misses in a row)--> open --(`open_s` later)--> half-open --(the probe answers)--> closed
                                                     ^---------------------(the probe fails or is late)------'

While a stage is open or half-open, no request calls it: each answers at once without that stage. The half-open
probe is one call in the background, with the whole request's budget: a request never waits on a stage that was
last seen down. Without that, a dead model replica (calls hang until the stage's deadline until Ray replaces it,
about 25 s on two cores) cost every request its full stage deadline for each probe round: 3 requests a second at
60 ms, the p99 of the distributed app's CF-kill drill (138-142 ms against a 140 ms bar with CI's demo running beside).

The pattern is Nygard's (Release It!, 2nd ed., "Circuit Breaker"); the background probe is the "health check in
half-open" variant. Plain asyncio; one instance per stage per chain, used from one event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("recserve")


def _consume(task: asyncio.Future) -> None:
    """Retrieve an abandoned task's outcome, so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


async def within(call: Awaitable[T], until: float) -> tuple[T | None, str | None]:
    """The call's result by `until` (time.monotonic() seconds), or why not: "timeout" or "error". The deadline is
    hard: a late call is cancelled and left behind, never awaited (asyncio.wait_for waits for the cancellation to
    finish, and a call to a dead replica's handle took seconds to cancel).

    The task is also each request's yield to the event loop once the edge has admitted it, so the edge's in-flight
    count (and its shedding) sees the requests queued behind. Run at once instead (Python 3.12's eager tasks), an
    inline stage saved 17 us a call, but a burst of 200 at max_in_flight 8 was answered with no 503 at all
    (docs/benchmarks.md, "The switch's tail, third pass")."""
    task = asyncio.ensure_future(call)
    done, _ = await asyncio.wait({task}, timeout=max(until - time.monotonic(), 0.0))
    if not done:
        task.cancel()
        task.add_done_callback(_consume)
        return None, "timeout"
    if task.exception() is not None:
        return None, "error"
    return task.result(), None


class Breaker:
    """One stage's breaker. `failures` errors or misses in a row open it for `open_s` seconds; then one probe call
    runs in the background with `probe_s` seconds, and closes it by answering in time (or opens it again)."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.failures = 0  # errors or misses in a row while closed
        self.open_until = 0.0  # monotonic s; 0 while closed
        self.probe: asyncio.Task | None = None  # the half-open call, held so it is not collected mid-flight

    @property
    def state(self) -> str:
        """The state: "closed", "open" or "half-open"."""
        if self.probe is not None:
            return "half-open"
        return "open" if self.open_until else "closed"

    async def call(
        self, call: Callable[[], Awaitable[T]], until: float, *, failures: int, open_s: float, probe_s: float
    ) -> tuple[T | None, str | None]:
        """The call's result by `until` (monotonic s), or (None, why): "timeout", "error", or "unavailable" without
        a call while the breaker is open or half-open. The first request after the open period starts the probe
        and answers "unavailable" itself."""
        if self.open_until:
            if self.probe is None and time.monotonic() >= self.open_until:
                self.probe = asyncio.ensure_future(self._probe(call, probe_s, open_s))
            return None, "unavailable"
        out, err = await within(call(), until)
        if err is None:
            self.failures = 0
        else:
            self.failures += 1
            if self.failures >= failures and not self.open_until:
                self.failures = 0
                self.open_until = time.monotonic() + open_s
                log.warning("stage %s skipped after %d failures in a row (the last: %s)", self.stage, failures, err)
        return out, err

    async def _probe(self, call: Callable[[], Awaitable[T]], probe_s: float, open_s: float) -> None:
        try:
            _, err = await within(call(), time.monotonic() + probe_s)
        finally:
            self.probe = None
        if err is None:
            self.open_until = 0.0
            log.warning("stage %s answered its probe: called again", self.stage)
        else:  # quietly: one a second while a replica is away
            self.open_until = time.monotonic() + open_s
