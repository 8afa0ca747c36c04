"""The stage circuit breaker over real coroutines: a stage that errs, one that hangs like a dead replica's handle,
and one that answers."""

from __future__ import annotations

import asyncio
import time

from chain.breaker import Breaker, within


class Stage:
    """A stage whose behaviour the test sets: "ok", "error" or "hang" (never answers, like a dead replica)."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.mode == "error":
            raise RuntimeError("stage down")
        if self.mode == "hang":
            await asyncio.Event().wait()
        return "answer"


def test_within_gives_the_result_an_error_or_a_timeout_and_leaves_a_late_call_behind():
    async def go() -> list[tuple[str | None, str | None]]:
        stage = Stage()
        out = [await within(stage(), time.monotonic() + 1)]
        stage.mode = "error"
        out.append(await within(stage(), time.monotonic() + 1))
        stage.mode = "hang"
        began = time.monotonic()
        out.append(await within(stage(), began + 0.05))
        assert time.monotonic() - began < 1.0  # the hanging call was not awaited past its deadline
        return out

    assert asyncio.run(go()) == [("answer", None), (None, "error"), (None, "timeout")]


def test_failures_in_a_row_open_it_and_no_request_calls_the_stage_while_open():
    async def go() -> None:
        stage, b = Stage(), Breaker("cf")
        knobs = {"failures": 3, "open_s": 60.0, "probe_s": 0.05}
        stage.mode = "error"
        assert (await b.call(stage, time.monotonic() + 1, **knobs))[1] == "error"
        stage.mode = "ok"  # a success in between resets the count
        assert await b.call(stage, time.monotonic() + 1, **knobs) == ("answer", None)
        stage.mode = "hang"  # misses count as failures
        reasons = [(await b.call(stage, time.monotonic() + 0.02, **knobs))[1] for _ in range(3)]
        assert reasons == ["timeout"] * 3 and b.state == "open" and stage.calls == 5
        assert [(await b.call(stage, time.monotonic() + 1, **knobs))[1] for _ in range(10)] == ["unavailable"] * 10
        assert stage.calls == 5

    asyncio.run(go())


def test_half_open_probes_in_the_background_and_closes_only_when_the_probe_answers():
    async def go() -> None:
        stage, b = Stage(), Breaker("cf")
        knobs = {"failures": 1, "open_s": 0.05, "probe_s": 0.5}
        stage.mode = "hang"
        await b.call(stage, time.monotonic() + 0.01, **knobs)
        assert b.state == "open"
        await asyncio.sleep(0.06)
        # The first request after the open period starts the probe and answers without the stage at once; so do
        # the requests while the probe is out.
        began = time.monotonic()
        for _ in range(5):
            assert await b.call(stage, time.monotonic() + 1, **knobs) == (None, "unavailable")
        await asyncio.sleep(0.01)  # the probe's first step
        assert time.monotonic() - began < 0.4 and b.state == "half-open" and stage.calls == 2
        await asyncio.sleep(0.55)  # the probe hung past probe_s: open again, without a request paying for it
        assert b.state == "open"
        stage.mode = "ok"
        await asyncio.sleep(0.06)
        assert await b.call(stage, time.monotonic() + 1, **knobs) == (None, "unavailable")  # starts the probe
        await asyncio.sleep(0.01)
        assert b.state == "closed"
        assert await b.call(stage, time.monotonic() + 1, **knobs) == ("answer", None)

    asyncio.run(go())
