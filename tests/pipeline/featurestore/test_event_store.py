"""Events through the push path against the real Redis: concurrency, equivalence with Feast's push, failures."""

from __future__ import annotations

import datetime as dt
import threading
import time

import pandas as pd
import pytest
from feast.data_source import PushMode

from feature_repo import definitions as defs
from models.errors import StoreUnavailableError, WriteConflictError
from models.features import EVENT_TIMESTAMP, USER_KEY
from models.realtime import EVENT_TYPES, Realtime
from pipeline.featurestore.events import (
    EventIds,
    EventSettings,
    EventWriter,
    WriteResult,
    event_id_key,
    event_ids_pending_key,
    validate_events,
)
from pipeline.featurestore.store import entity_key, read_realtime, redis_client
from settings import StoreSettings
from tests.pipeline.conftest import catalog

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def items(small_bundle) -> list[str]:
    return catalog(small_bundle)


@pytest.fixture(scope="module")
def writer(slice_online, feature_store, store_settings) -> EventWriter:
    return EventWriter(feature_store, store_settings, EventSettings())


def test_an_event_is_visible_to_the_next_read(writer, slice_online, items):
    before = slice_online.user("12347").realtime
    writer.write(
        validate_events(
            [{"user_id": "12347", "item_id": items[3], "event_type": "add_to_cart"}], set(items), writer.settings
        )
    )
    after = slice_online.user("12347").realtime
    assert after.event_count == before.event_count + 1
    assert after.events[0].item_id == items[3] and after.events[0].event_type == "add_to_cart"
    now_ms = after.events[0].ts_ms
    assert after.counts(now_ms)["1h"]["add_to_cart"] == before.counts(now_ms)["1h"]["add_to_cart"] + 1


def test_twenty_concurrent_writers_lose_and_double_count_nothing(feature_store, store_settings, slice_online, items):
    """200 events for one user from 20 writers, each with its own connection, in batches of 1-3."""
    user = "concurrency-user"
    base = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=30)
    sent = [
        {
            "user_id": user,
            "item_id": items[n % len(items)],
            "event_type": EVENT_TYPES[n % 3],
            "timestamp": (base + dt.timedelta(milliseconds=10 * n)).isoformat(),
        }
        for n in range(200)
    ]
    errors: list[BaseException] = []
    start = threading.Barrier(20)

    def run(w: int) -> None:
        try:
            writer = EventWriter(feature_store, store_settings, EventSettings())
            mine = sent[w::20]
            start.wait()
            pos = 0
            while pos < len(mine):
                size = 1 + (pos + w) % 3
                writer.write(validate_events(mine[pos : pos + size], set(items), writer.settings))
                pos += size
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    got = slice_online.user(user).realtime
    assert got.event_count == 200
    stored = sorted((e.ts_ms, e.item_id, e.event_type) for e in got.events)
    expected = sorted(
        (int(dt.datetime.fromisoformat(s["timestamp"]).timestamp() * 1000), s["item_id"], s["event_type"]) for s in sent
    )
    assert stored == expected  # every event once, none twice
    assert [e.ts_ms for e in got.events] == sorted((e.ts_ms for e in got.events), reverse=True)
    counts = got.counts(expected[-1][0] + 1)
    assert counts["1h"] == {"view": 67, "add_to_cart": 67, "purchase": 66}
    assert counts["1d"] == counts["1h"]
    assert got.last_event_ts_ms == expected[-1][0]


def test_the_writer_stores_exactly_what_feast_push_stores(writer, feature_store, store_settings):
    window = Realtime.empty().merged([], 0, writer.settings.window)
    ts = dt.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=dt.UTC)
    columns = window.columns() | {
        "rt_event_item_ids": ["85123A", "22423"],
        "rt_event_types": ["view", "purchase"],
        "rt_event_ts_ms": [1767323045678, 1767323045000],
        "rt_last_event_ts_ms": 1767323045678,
        "rt_event_count": 7,
    }
    writer.push_rows([{USER_KEY: "via-writer", EVENT_TIMESTAMP: ts, **columns}])
    feature_store.push(
        defs.PUSH_SOURCE, pd.DataFrame([{USER_KEY: "via-feast", EVENT_TIMESTAMP: ts, **columns}]), to=PushMode.ONLINE
    )
    client = redis_client(store_settings)
    ours = client.hgetall(entity_key(store_settings.project, **{USER_KEY: "via-writer"}))
    feasts = client.hgetall(entity_key(store_settings.project, **{USER_KEY: "via-feast"}))
    assert ours and ours == feasts


def test_a_dead_redis_is_a_retryable_error_and_nothing_is_half_written(
    writer, feature_store, store_settings, slice_online, items
):
    dead = StoreSettings(redis="127.0.0.1:1", project=store_settings.project, registry=store_settings.registry)
    broken = EventWriter(feature_store, dead, EventSettings())
    events = validate_events(
        [{"user_id": "retry-user", "item_id": items[0], "event_type": "view"}], set(items), broken.settings
    )
    with pytest.raises(StoreUnavailableError, match="retry") as info:
        broken.write(events)
    assert info.value.retryable
    assert slice_online.user("retry-user").realtime.event_count == 0
    writer.write(events)  # the caller's retry
    assert slice_online.user("retry-user").realtime.event_count == 1


def test_a_lock_held_too_long_is_a_retryable_conflict(feature_store, store_settings, items):
    impatient = EventWriter(feature_store, store_settings, EventSettings(lock_wait_ms=50))
    client = redis_client(store_settings)
    key = f"recserve:{store_settings.project}:event-lock:locked-user"
    client.set(key, "someone-else", px=10_000)
    try:
        events = validate_events(
            [{"user_id": "locked-user", "item_id": items[0], "event_type": "view"}], set(items), impatient.settings
        )
        with pytest.raises(WriteConflictError, match="retry") as info:
            impatient.write(events)
        assert info.value.retryable
    finally:
        client.delete(key)


def events_for(user: str, items: list[str], *event_ids: str | None) -> list[dict]:
    return [
        {"user_id": user, "item_id": items[n % len(items)], "event_type": "view"}
        | ({"event_id": e} if e is not None else {})
        for n, e in enumerate(event_ids)
    ]


def write(writer: EventWriter, user: str, items: list[str], *event_ids: str | None) -> WriteResult:
    """One event per id (None: an event without one), validated and written."""
    return writer.write(validate_events(events_for(user, items, *event_ids), set(items), writer.settings))


def count(slice_online, user: str) -> int:
    return slice_online.user(user).realtime.event_count


def test_a_repeated_event_id_is_accepted_and_stored_once(writer, slice_online, items):
    user = "idempotent-user"
    first = write(writer, user, items, "a", "b")
    assert (first.accepted, first.repeats) == (2, 0) and count(slice_online, user) == 2
    again = write(writer, user, items, "a", "b")  # the client's retry of a batch whose answer it never got
    assert (again.accepted, again.repeats) == (2, 2) and count(slice_online, user) == 2
    mixed = write(
        writer, user, items, "b", "c", "c", None, None
    )  # a repeat, a new id twice in one batch, two events without ids
    assert (mixed.accepted, mixed.repeats) == (5, 2) and count(slice_online, user) == 5
    other = write(writer, "another-user", items, "a")
    assert other.repeats == 0 and count(slice_online, "another-user") == 1  # ids are per user


def test_an_event_id_is_kept_for_the_retention_window_with_its_rows_stamp(
    feature_store, store_settings, slice_online, items
):
    writer = EventWriter(feature_store, store_settings, EventSettings(event_id_retention_s=1))
    user = "short-memory-user"
    write(writer, user, items, "once")
    client = redis_client(store_settings)
    key = event_id_key(store_settings.project, user, "once")
    assert 0 < client.pttl(key) <= 1000
    stored_ns = read_realtime(client, store_settings.project, [user])[user][1]
    assert int(client.get(key)) == stored_ns  # the stamp Feast stored for the row that carried the event
    assert not client.exists(event_ids_pending_key(store_settings.project, user))
    assert write(writer, user, items, "once").repeats == 1
    time.sleep(1.1)
    assert write(writer, user, items, "once").repeats == 0
    assert count(slice_online, user) == 2  # past the window the id is forgotten, and the event counts again


def test_a_retry_after_a_writer_died_before_its_push_stores_the_events(writer, store_settings, slice_online, items):
    """What a writer leaves when it dies between recording its ids and pushing its row: the ids, noted as pending,
    with a stamp newer than the stored row. The retry must store the events."""
    user = "died-before-push"
    write(writer, user, items, None)
    client = redis_client(store_settings)
    stored_ns = read_realtime(client, store_settings.project, [user])[user][1]
    EventIds(client, store_settings.project, 60).record({user: (stored_ns + 1_000_000, ["lost-1"])})
    retry = write(writer, user, items, "lost-1")
    assert retry.repeats == 0 and count(slice_online, user) == 2
    assert not client.exists(event_ids_pending_key(store_settings.project, user))
    assert write(writer, user, items, "lost-1").repeats == 1


def test_a_retry_after_a_writer_died_after_its_push_counts_nothing_twice(writer, store_settings, slice_online, items):
    """The writer died after its row landed, before it removed its pending note: the retry is a repeat."""
    user = "died-after-push"
    write(writer, user, items, "landed-1")
    client = redis_client(store_settings)
    stored_ns = read_realtime(client, store_settings.project, [user])[user][1]
    EventIds(client, store_settings.project, 60).record({user: (stored_ns, ["landed-1"])})  # the note it left
    retry = write(writer, user, items, "landed-1")
    assert retry.repeats == 1 and count(slice_online, user) == 1


def test_the_next_write_settles_a_dead_writers_ids_even_when_a_later_write_lands_first(
    writer, store_settings, slice_online, items
):
    """A write without ids lands between the crash and the client's retry: its newer row must not make the dead
    writer's ids look stored."""
    user = "settled-by-next-write"
    client = redis_client(store_settings)
    EventIds(client, store_settings.project, 60).record({user: (1, ["lost-2"])})  # no row yet: stored stamp is 0
    write(writer, user, items, None)
    assert not client.exists(event_id_key(store_settings.project, user, "lost-2"))
    retry = write(writer, user, items, "lost-2")
    assert retry.repeats == 0 and count(slice_online, user) == 2
