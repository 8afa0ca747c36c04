"""Event validation: every bad event is refused with its index and field named. No Redis needed."""

from __future__ import annotations

import datetime as dt

import pytest

from models.errors import InvalidEventError
from pipeline.featurestore.events import EventSettings, validate_events

NOW = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)
ITEMS = frozenset({"85123A", "22423"})
GOOD = {"user_id": "12347", "item_id": "85123A", "event_type": "view"}


def check(raw, settings: EventSettings | None = None):
    return validate_events(raw, ITEMS, settings or EventSettings(), now=NOW)


def test_a_good_batch_is_typed_and_stamped():
    events = check([GOOD, {**GOOD, "event_type": "purchase", "timestamp": "2026-11-29T11:59:00"}])
    assert events[0].timestamp == NOW  # omitted: the time it arrived
    assert events[1].timestamp == dt.datetime(2026, 11, 29, 11, 59, tzinfo=dt.UTC)  # naive means UTC
    assert [e.event_type for e in events] == ["view", "purchase"]


@pytest.mark.parametrize(
    ("raw", "where", "words"),
    [
        ([GOOD, {**GOOD, "event_type": "click"}], "events[1].event_type", "'click' is not one of view"),
        ([{"user_id": "12347", "item_id": "85123A"}], "events[0].event_type", "is required"),
        ([{**GOOD, "user_id": 12347}], "events[0].user_id", "must be a string"),
        ([{**GOOD, "user_id": ""}], "events[0].user_id", "at least 1 character"),
        ([{**GOOD, "item_id": None}], "events[0].item_id", "must be a string"),
        ([{**GOOD, "timestamp": "yesterday"}], "events[0].timestamp", "datetime"),
        ([{**GOOD, "timestamp": "2026-11-29T12:06:00Z"}], "events[0].timestamp", "more than 5 minutes in the future"),
        ([{**GOOD, "item_id": "NOPE"}], "events[0].item_id", "not in the catalog"),
        ([{**GOOD, "colour": "red"}], "events[0].colour", "is not a field of an event"),
        ([GOOD, "view"], "events[1].event", "must be an object"),
        ({"user_id": "1"}, "events", "must be a list"),
        ([], "events", "is empty"),
        ([GOOD] * 501, "events", "holds 501 events; the limit is 500"),
    ],
)
def test_bad_events_name_the_event_and_field(raw, where, words):
    with pytest.raises(InvalidEventError) as info:
        check(raw)
    assert str(info.value).startswith(f"{where}: ")
    assert words in str(info.value)


def test_a_timestamp_within_five_minutes_ahead_is_clock_skew_and_accepted():
    (event,) = check([{**GOOD, "timestamp": "2026-11-29T12:04:00+00:00"}])
    assert event.timestamp == NOW + dt.timedelta(minutes=4)


def test_new_items_pass_when_the_deployment_allows_them():
    (event,) = check([{**GOOD, "item_id": "99999Z"}], EventSettings(allow_new_items=True))
    assert event.item_id == "99999Z"


def test_ids_are_normalized_as_the_data_is_cleaned():
    (event,) = check([{**GOOD, "user_id": " 12347\t", "item_id": " 85123a "}])
    assert (event.user_id, event.item_id) == ("12347", "85123A")  # and so found in the catalog


@pytest.mark.parametrize(
    ("raw", "where", "words"),
    [
        ([{**GOOD, "user_id": "  "}], "events[0].user_id", "is only whitespace: send the id"),
        ([{**GOOD, "item_id": "\n"}], "events[0].item_id", "is only whitespace"),
        ([{**GOOD, "user_id": " " * 60 + "1234567"}], "events[0].user_id", "at most 64 characters"),  # as sent
        ([{**GOOD, "event_id": ""}], "events[0].event_id", "at least 1 character"),
        ([{**GOOD, "event_id": "e" * 129}], "events[0].event_id", "at most 128 characters"),
        ([{**GOOD, "event_id": 7}], "events[0].event_id", "must be a string"),
        ([{**GOOD, "timestamp": 1764417600}], "events[0].timestamp", "must be ISO 8601 text"),
        ([{**GOOD, "id": "e1"}], "events[0].id", "optionally timestamp and event_id"),
    ],
)
def test_bad_ids_and_timestamps_name_the_event_and_field(raw, where, words):
    with pytest.raises(InvalidEventError) as info:
        check(raw)
    assert str(info.value).startswith(f"{where}: ") and words in str(info.value)


def test_an_event_id_is_kept_as_sent():
    (event,) = check([{**GOOD, "event_id": " Retry-Me:1 "}])
    assert event.event_id == " Retry-Me:1 "  # opaque: compared exactly, never normalized
