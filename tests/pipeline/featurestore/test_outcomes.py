"""Online outcomes on the real Redis, under a project of the test's own: exposures, the attribution window, one
conversion per answer, state shared by instances (replicas) and kept across new ones (restarts), and a Redis
that does not answer."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from models.realtime import EventRecord
from pipeline.featurestore.outcomes import ArmCounts, Outcomes, OutcomeSettings, exposed_key
from pipeline.featurestore.store import REDIS_ERRORS, redis_client
from pipeline.serve.metrics import NullRecorder
from settings import StoreSettings

WINDOW_S = 1800
T0 = 1_764_000_000_000  # ms since the epoch; exposures and events are stamped explicitly


class Counted(NullRecorder):
    """The metrics an Outcomes reports, kept in memory (the no-Ray recorder, with counts)."""

    def __init__(self) -> None:
        self.conversions: dict[tuple[str, str], int] = {}
        self.outcomes: dict[str, int] = {}

    def conversion(self, arm: str, version: str) -> None:
        self.conversions[(arm, version)] = self.conversions.get((arm, version), 0) + 1

    def outcome(self, outcome: str, n: int) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + n


@pytest.fixture
def project() -> Iterator[str]:
    name = f"test_{uuid.uuid4().hex[:12]}"
    yield name
    client = redis_client(StoreSettings(project=name))
    keys = list(client.scan_iter(match=f"recserve:{name}:*"))
    if keys:
        client.delete(*keys)


def outcomes(project: str, recorder: Counted | None = None, **settings: object) -> Outcomes:
    return Outcomes(
        redis_client(StoreSettings(project=project)),
        project,
        OutcomeSettings(window_s=WINDOW_S, **settings),  # type: ignore[arg-type]
        recorder,
    )


def buy(item: str, at_ms: int, kind: str = "purchase") -> EventRecord:
    return EventRecord(item, kind, at_ms)  # type: ignore[arg-type]


def counts(o: Outcomes, salt: str = "s1") -> dict[str, tuple[int, int]]:
    return {c.arm: (c.answers, c.converted) for c in o.counts(salt)}


def test_a_purchase_or_add_to_cart_of_a_shown_item_within_the_window_converts_the_answer(project):
    rec = Counted()
    o = outcomes(project, rec)
    a1 = o.exposed("s1", "u1", "champion", "v1", ["A", "B", "C"], now_ms=T0)
    o.exposed("s1", "u2", "canary", "v2", ["A", "D"], now_ms=T0)
    assert o.pending == 2 and o.counts("s1") == []  # nothing in Redis before the flush
    assert o.flush() == 2 and o.pending == 0
    got = o.attribute("s1", {"u1": [buy("B", T0 + 60_000)], "u2": [buy("D", T0 + 5_000, "add_to_cart")]})
    assert {(c.answer_id, c.arm, c.item_id) for c in got if c.user_id == "u1"} == {(a1, "champion", "B")}
    assert {c.arm for c in got} == {"champion", "canary"}
    assert counts(o) == {"champion": (1, 1), "canary": (1, 1)}
    assert rec.conversions == {("champion", "v1"): 1, ("canary", "v2"): 1}
    assert o.counts("s1") == [ArmCounts("canary", "v2", 1, 1), ArmCounts("champion", "v1", 1, 1)]


def test_views_events_outside_the_window_and_items_not_shown_do_not_convert(project):
    o = outcomes(project)
    o.exposed("s1", "u1", "champion", "v1", ["A", "B"], now_ms=T0)
    o.exposed("s1", "u2", "champion", "v1", ["C"], now_ms=T0)
    o.flush()
    events = {
        "u1": [
            buy("A", T0 + 1000, "view"),  # a view is not an outcome
            buy("B", T0 + WINDOW_S * 1000 + 1),  # one ms past the window
            buy("A", T0 - 1),  # before the answer: it cannot have caused it
            buy("C", T0 + 1000),  # shown to u2, not to u1
            buy("Z", T0 + 1000),  # shown to nobody
        ]
    }
    assert o.attribute("s1", events) == []
    assert counts(o) == {"champion": (2, 0)}
    # The window's edge itself counts.
    assert len(o.attribute("s1", {"u1": [buy("B", T0 + WINDOW_S * 1000)]})) == 1


def test_the_conversion_goes_to_the_arm_that_showed_the_item_not_another(project):
    o = outcomes(project)
    o.exposed("s1", "u1", "champion", "v1", ["A"], now_ms=T0)
    o.exposed("s1", "u1", "canary", "v2", ["B"], now_ms=T0 + 10)  # e.g. the user moved arms as a canary grew
    o.flush()
    (c,) = o.attribute("s1", {"u1": [buy("A", T0 + 1000)]})
    assert (c.arm, c.version) == ("champion", "v1")
    assert counts(o) == {"champion": (1, 1), "canary": (1, 0)}


def test_one_answer_converts_at_most_once(project):
    o = outcomes(project)
    o.exposed("s1", "u1", "champion", "v1", ["A", "B", "C"], now_ms=T0)
    o.flush()
    assert len(o.attribute("s1", {"u1": [buy("A", T0 + 1), buy("B", T0 + 2)]})) == 1  # two items, one call
    assert o.attribute("s1", {"u1": [buy("C", T0 + 3), buy("A", T0 + 4, "add_to_cart")]}) == []  # a later call
    assert counts(o) == {"champion": (1, 1)}
    # A second answer showing the same item converts in its own right.
    o.exposed("s1", "u1", "champion", "v1", ["A"], now_ms=T0 + 100)
    o.flush()
    assert len(o.attribute("s1", {"u1": [buy("A", T0 + 200)]})) == 1
    assert counts(o) == {"champion": (2, 2)}


def test_state_is_shared_by_replicas_and_survives_a_restart(project):
    replica_a, replica_b = outcomes(project), outcomes(project)
    replica_a.exposed("s1", "u1", "champion", "v1", ["A"], now_ms=T0)
    replica_a.flush()
    del replica_a  # "restart": only Redis remembers
    restarted = outcomes(project)
    assert len(replica_b.attribute("s1", {"u1": [buy("A", T0 + 1000)]})) == 1
    assert restarted.attribute("s1", {"u1": [buy("A", T0 + 2000)]}) == []  # converted already, by another replica
    assert counts(restarted) == counts(replica_b) == {"champion": (1, 1)}


def test_a_new_salt_is_a_new_experiment_with_fresh_counts(project):
    o = outcomes(project)
    o.exposed("s1", "u1", "champion", "v1", ["A"], now_ms=T0)
    o.flush()
    assert o.attribute("s2", {"u1": [buy("A", T0 + 1000)]}) == []  # shown under s1, bought under s2
    assert counts(o, "s2") == {}
    assert counts(o, "s1") == {"champion": (1, 0)}
    assert o.clear("s1") >= 2 and counts(o, "s1") == {}


def test_the_exposure_hash_expires_with_the_window(project):
    o = outcomes(project)
    o.exposed("s1", "u1", "champion", "v1", ["A"], now_ms=T0)
    o.flush()
    ttl = o.client.ttl(exposed_key(project, "s1", "u1"))
    assert 0 < ttl <= WINDOW_S


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def test_with_redis_down_exposures_are_buffered_bounded_and_counted_never_raised():
    rec = Counted()
    client = redis.Redis(port=dead_port(), socket_connect_timeout=0.2, socket_timeout=0.2)
    o = Outcomes(client, "test_dead", OutcomeSettings(max_buffer=5), rec)
    started = time.perf_counter()
    for i in range(8):
        o.exposed("s1", f"u{i}", "champion", "v1", ["A"])
    assert (time.perf_counter() - started) < 0.05  # no I/O on the request's path
    assert o.pending == 5 and o.dropped == 3
    assert o.flush() == 0  # failed: kept to retry, not raised
    assert o.pending == 5
    assert rec.outcomes["exposures_dropped"] == 3 and rec.outcomes["flush_failed"] == 5
    with pytest.raises(REDIS_ERRORS):
        o.attribute("s1", {"u1": [buy("A", T0)]})
