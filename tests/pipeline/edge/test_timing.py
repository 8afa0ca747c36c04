"""X-Request-Start: the proxy's stamp moves the start of the edge's clock back by the wait behind the proxy, and
a stamp that cannot be the proxy's is ignored."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from chain.ports import NullRecorder
from pipeline.edge.timing import MAX_PROXY_WAIT_MS, proxy_wait_ms

NOW = 1_796_025_938.25


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"t=1796025938200000", 50.0),  # microseconds, as HAProxy stamps it
        (b"t=1796025938200", 50.0),  # milliseconds
        (b"t=1796025938.2", 50.0),  # seconds
        (b" t=1796025938250000 ", 0.0),
    ],
)
def test_the_stamp_in_each_unit_gives_the_wait(value, expected):
    assert proxy_wait_ms([(b"x-request-start", value)], NOW) == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize(
    "value",
    [
        b"t=1796025939250000",  # a second in the future: another node's clock
        f"t={int((NOW - MAX_PROXY_WAIT_MS / 1000 - 1) * 1e6)}".encode(),  # older than the proxy's deadline: forged
        b"1796025938200000",  # no t=
        b"t=soon",
        b"t=-5",
    ],
)
def test_a_stamp_that_cannot_be_the_proxys_is_ignored(value):
    assert proxy_wait_ms([(b"x-request-start", value)], NOW) == 0.0


def test_no_stamp_no_wait():
    assert proxy_wait_ms([(b"x-request-id", b"abc")], NOW) == 0.0


class Latencies(NullRecorder):
    def __init__(self) -> None:
        self.ms: list[float] = []

    def request(self, route: str, status: int, ms: float) -> None:
        self.ms.append(ms)


def test_the_edge_records_and_answers_the_time_since_the_stamp(edge_over):
    recorder = Latencies()

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    edge = edge_over(app, recorder)

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=edge), base_url="http://edge") as client:
            stamp = int((time.time() - 0.040) * 1e6)  # stamped by the proxy 40 ms ago
            return await client.post("/recommend", json={}, headers={"X-Request-Start": f"t={stamp}"})

    r = asyncio.run(scenario())
    found = re.fullmatch(r"proxy;dur=([0-9.]+), edge;dur=([0-9.]+)", r.headers["server-timing"])
    assert found, r.headers["server-timing"]
    proxy, edge_ms = float(found[1]), float(found[2])
    assert 40.0 <= proxy < 1000.0 and edge_ms >= proxy
    (recorded,) = recorder.ms
    assert recorded >= edge_ms  # the metric's clock stops after the answer's headers went out
