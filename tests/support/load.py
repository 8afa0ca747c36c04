"""Open-loop HTTP load for drills inside pytest (no locust in pytest's process): requests are sent on a fixed
schedule whatever the answers do, so a stall shows as latency and failures, not as a lower offered rate."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx


@dataclass(frozen=True)
class Outcome:
    sent_at: float  # seconds since the run began
    status: int  # 0 when no HTTP answer came (refused, reset, timeout)
    ms: float
    retry_after: str | None
    degraded: bool
    error: str = ""
    server_ms: float | None = None  # the ingress's own time for it (Server-Timing: edge;dur=...)


@dataclass
class Run:
    outcomes: list[Outcome] = field(default_factory=list)

    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != 200]

    def p99_ms(self) -> float:
        ms = sorted(o.ms for o in self.outcomes)
        return ms[min(len(ms) - 1, int(0.99 * len(ms)))] if ms else float("nan")

    def server_p99_ms(self) -> float:
        """p99 of the ingress's own times for the answered requests (their Server-Timing header)."""
        ms = sorted(o.server_ms for o in self.outcomes if o.server_ms is not None)
        return ms[min(len(ms) - 1, int(0.99 * len(ms)))] if ms else float("nan")


def open_loop(
    base_url: str, rate: float, seconds: float, body: Callable[[int], dict], timeout_s: float = 10.0
) -> tuple[threading.Thread, Run]:
    """Start POST /recommend at `rate` per second for `seconds` in a thread of its own; join the thread, then read
    the Run."""
    run = Run()

    async def go() -> None:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
        async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as client:
            began = time.perf_counter()

            async def one(i: int, due: float) -> None:
                t = time.perf_counter()
                try:
                    r = await client.post("/recommend", json=body(i))
                    degraded = r.status_code == 200 and bool(r.json().get("degraded"))
                    timing = re.search(r"edge;dur=([0-9.]+)", r.headers.get("server-timing", ""))
                    out = Outcome(
                        due,
                        r.status_code,
                        0.0,
                        r.headers.get("retry-after"),
                        degraded,
                        r.text[:120],
                        float(timing[1]) if timing else None,
                    )
                except httpx.HTTPError as exc:
                    out = Outcome(due, 0, 0.0, None, False, f"{type(exc).__name__}: {exc}")
                ms = (time.perf_counter() - t) * 1000
                run.outcomes.append(
                    Outcome(out.sent_at, out.status, ms, out.retry_after, out.degraded, out.error, out.server_ms)
                )

            tasks = []
            for i in range(int(rate * seconds)):
                due = i / rate
                await asyncio.sleep(max(0.0, began + due - time.perf_counter()))
                tasks.append(asyncio.create_task(one(i, due)))
            await asyncio.gather(*tasks)

    thread = threading.Thread(target=lambda: asyncio.run(go()), daemon=True)
    thread.start()
    return thread, run
