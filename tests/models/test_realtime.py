from __future__ import annotations

from models.features import REALTIME_FEATURES
from models.realtime import DAY_MS, HOUR_MS, EventRecord, Realtime, WindowSettings

NOW = 1_700_000_000_000


def ev(item: str, kind: str, age_ms: int) -> EventRecord:
    return EventRecord(item, kind, NOW - age_ms)  # type: ignore[arg-type]


def test_merge_orders_newest_first_and_counts_every_event():
    w = Realtime.empty().merged([ev("a", "view", 5000), ev("b", "purchase", 1000)], NOW, WindowSettings())
    w = w.merged([ev("c", "add_to_cart", 3000)], NOW, WindowSettings())
    assert [e.item_id for e in w.events] == ["b", "c", "a"]
    assert w.event_count == 3
    assert w.last_event_ts_ms == NOW - 1000


def test_equal_timestamps_put_the_latest_arrival_first():
    w = Realtime.empty().merged([ev("a", "view", 0), ev("b", "view", 0)], NOW, WindowSettings())
    w = w.merged([ev("c", "view", 0)], NOW, WindowSettings())
    assert [e.item_id for e in w.events] == ["c", "b", "a"]


def test_counts_age_out_of_the_hour_and_the_day():
    events = [ev("a", "view", 10), ev("b", "view", HOUR_MS + 1), ev("c", "purchase", 2 * HOUR_MS)]
    w = Realtime.empty().merged(events, NOW, WindowSettings())
    assert w.counts(NOW) == {
        "1h": {"view": 1, "add_to_cart": 0, "purchase": 0},
        "1d": {"view": 2, "add_to_cart": 0, "purchase": 1},
    }
    later = w.counts(NOW + DAY_MS)
    assert later["1d"] == {"view": 0, "add_to_cart": 0, "purchase": 0}
    assert w.event_count == 3  # the lifetime total does not age


def test_trim_keeps_the_newest_whatever_their_age_and_the_last_day_up_to_the_cap():
    settings = WindowSettings(keep_last=2, max_events=4)
    old = [ev(f"old{i}", "view", 3 * DAY_MS + i) for i in range(5)]
    w = Realtime.empty().merged(old, NOW, settings)
    assert [e.item_id for e in w.events] == ["old0", "old1"]  # older than a day: only keep_last survive
    recent = [ev(f"new{i}", "view", 1000 + i) for i in range(6)]
    w = w.merged(recent, NOW, settings)
    assert [e.item_id for e in w.events] == ["new0", "new1", "new2", "new3"]
    assert w.event_count == 11


def test_columns_round_trip_under_the_feature_names():
    w = Realtime.empty().merged([ev("a", "view", 5), ev("b", "purchase", 1)], NOW, WindowSettings())
    cols = w.columns()
    assert tuple(cols) == REALTIME_FEATURES
    assert cols["rt_event_item_ids"] == ["b", "a"] and cols["rt_event_types"] == ["purchase", "view"]
    assert Realtime.from_columns(cols) == w
    assert Realtime.from_columns(dict.fromkeys(REALTIME_FEATURES)) == Realtime.empty()
