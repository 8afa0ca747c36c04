"""Open-loop HTTP load for drills inside pytest (no locust in pytest's process): requests are sent on a fixed
schedule whatever the answers do, so a stall shows as latency and failures, not as a lower offered rate.

Two clients: httpx (the default: the drills' expectations, such as the error text of an answer cut short, are
httpx's) and aiohttp, the lighter one, for measuring latency. Each request's time is taken when its answer has been
read, before anything is decoded. At 20 req/s against the colocated app on the reference machine, the client's p99
was 5.3-7.2 ms above the server's (Server-Timing) with httpx, 2.3-2.7 ms with aiohttp (docs/benchmarks.md,
"Observability").
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

import aiohttp
import httpx


@dataclass(frozen=True)
class Outcome:
    sent_at: float  # seconds since the run began
    status: int  # 0 when no HTTP answer came (refused, reset, timeout)
    ms: float
    retry_after: str | None
    degraded: bool
    error: str = ""
    server_ms: float | None = None  # the server's time for it (Server-Timing: edge;dur=...)


@dataclass
class Run:
    outcomes: list[Outcome] = field(default_factory=list)

    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != 200]

    def p99_ms(self) -> float:
        ms = sorted(o.ms for o in self.outcomes)
        return ms[min(len(ms) - 1, int(0.99 * len(ms)))] if ms else float("nan")

    def server_p99_ms(self) -> float:
        """p99 of the server's own times for the answered requests (their Server-Timing header)."""
        ms = sorted(o.server_ms for o in self.outcomes if o.server_ms is not None)
        return ms[min(len(ms) - 1, int(0.99 * len(ms)))] if ms else float("nan")


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]  # case-insensitive, as both clients give them
    text: str


Post = Callable[[dict], Awaitable[Answer]]  # raises the client's own error when no answer came
Client = Literal["httpx", "aiohttp"]


@asynccontextmanager
async def _httpx_post(base_url: str, timeout_s: float) -> AsyncIterator[tuple[Post, tuple[type[Exception], ...]]]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as client:

        async def post(body: dict) -> Answer:
            r = await client.post("/recommend", json=body)
            return Answer(r.status_code, r.headers, r.text)

        yield post, (httpx.HTTPError,)


@asynccontextmanager
async def _aiohttp_post(base_url: str, timeout_s: float) -> AsyncIterator[tuple[Post, tuple[type[Exception], ...]]]:
    connector = aiohttp.TCPConnector(limit=200)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(base_url=base_url, connector=connector, timeout=timeout) as session:

        async def post(body: dict) -> Answer:
            async with session.post("/recommend", json=body) as r:
                return Answer(r.status, r.headers, await r.text())

        yield post, (aiohttp.ClientError, asyncio.TimeoutError)


def _outcome(due: float, ms: float, answer: Answer) -> Outcome:
    degraded = False
    if answer.status == 200:
        degraded = bool(json.loads(answer.text).get("degraded"))
    timing = re.search(r"edge;dur=([0-9.]+)", answer.headers.get("server-timing", ""))
    return Outcome(
        due,
        answer.status,
        ms,
        answer.headers.get("retry-after"),
        degraded,
        answer.text[:120],
        float(timing[1]) if timing else None,
    )


def open_loop(
    base_url: str,
    rate: float,
    seconds: float,
    body: Callable[[int], dict],
    timeout_s: float = 10.0,
    client: Client = "httpx",
) -> tuple[threading.Thread, Run]:
    """Start POST /recommend at `rate` per second for `seconds` in a thread of its own, with `client`; join the
    thread, then read the Run."""
    run = Run()
    session = _aiohttp_post if client == "aiohttp" else _httpx_post

    async def go() -> None:
        async with session(base_url, timeout_s) as (post, errors):
            began = time.perf_counter()

            async def one(i: int, due: float) -> None:
                t = time.perf_counter()
                try:
                    answer = await post(body(i))
                except errors as exc:
                    ms = (time.perf_counter() - t) * 1000
                    run.outcomes.append(Outcome(due, 0, ms, None, False, f"{type(exc).__name__}: {exc}"))
                    return
                run.outcomes.append(_outcome(due, (time.perf_counter() - t) * 1000, answer))

            tasks = []
            for i in range(int(rate * seconds)):
                due = i / rate
                await asyncio.sleep(max(0.0, began + due - time.perf_counter()))
                tasks.append(asyncio.create_task(one(i, due)))
            await asyncio.gather(*tasks)

    thread = threading.Thread(target=lambda: asyncio.run(go()), daemon=True)
    thread.start()
    return thread, run
