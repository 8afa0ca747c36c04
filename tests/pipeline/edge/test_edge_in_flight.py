"""The edge's in-flight gauge: the level that shedding compares with max_in_flight, reported on every change of a
work route's count, over a real ASGI app (one that holds its answer until the test lets it go)."""

from __future__ import annotations

import asyncio
import re

import httpx

from chain.ports import NullRecorder


class Levels(NullRecorder):
    def __init__(self) -> None:
        self.levels: list[int] = []

    def in_flight(self, n: int) -> None:
        self.levels.append(n)


def test_work_routes_report_each_level_and_other_routes_none(edge_over):
    recorder = Levels()
    release = asyncio.Event()

    async def app(scope, receive, send) -> None:
        if scope["path"] == "/recommend":
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    edge = edge_over(app, recorder, max_in_flight=2)

    async def scenario() -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=edge), base_url="http://edge") as client:
            held = [asyncio.create_task(client.post("/recommend", json={"user_id": "u"})) for _ in range(2)]
            while len(recorder.levels) < 2:
                await asyncio.sleep(0.01)
            shed = await client.post("/recommend", json={"user_id": "u"})  # a third, over the limit of 2
            assert shed.status_code == 503 and shed.headers["retry-after"]
            # No proxy in front: the clock starts at the edge.
            assert re.fullmatch(r"proxy;dur=0\.00, edge;dur=[0-9]+\.[0-9]{2}", shed.headers["server-timing"])
            assert (await client.get("/healthz")).status_code == 200  # not a work route: no level reported
            release.set()
            assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
        return recorder.levels

    assert asyncio.run(scenario()) == [1, 2, 1, 0]
