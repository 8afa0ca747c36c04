"""A user's real-time event window: what POST /events stores per user and what a request reads back.

The store keeps the retained events as parallel lists, newest first (the rt_* features). Counts over the last
hour and day are derived here at read time, so they age correctly between events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from models.features import REALTIME_FEATURES

EventType = Literal["view", "add_to_cart", "purchase"]
EVENT_TYPES: tuple[EventType, ...] = ("view", "add_to_cart", "purchase")
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
COUNT_WINDOWS: dict[str, int] = {"1h": HOUR_MS, "1d": DAY_MS}


@dataclass(frozen=True)
class EventRecord:
    item_id: str
    event_type: EventType
    ts_ms: int


@dataclass(frozen=True)
class WindowSettings:
    keep_last: int = 50  # the newest events are kept whatever their age
    max_events: int = 1000  # cap on what the last day may hold; counts saturate beyond it


@dataclass(frozen=True)
class Realtime:
    events: tuple[EventRecord, ...]  # newest first; ties keep arrival order, newest arrival first
    event_count: int  # every event ever accepted for the user
    last_event_ts_ms: int | None

    @classmethod
    def empty(cls) -> Realtime:
        return cls(events=(), event_count=0, last_event_ts_ms=None)

    @classmethod
    def from_columns(cls, values: dict[str, object]) -> Realtime:
        """Inverse of `columns`; a user with no row (all None) gets the empty window."""
        ids, types, ts, last, count = (values.get(name) for name in REALTIME_FEATURES)
        events = tuple(
            EventRecord(i, t, int(s))  # type: ignore[arg-type]
            for i, t, s in zip(ids or [], types or [], ts or [], strict=True)
        )
        return cls(events=events, event_count=int(count or 0), last_event_ts_ms=None if last is None else int(last))

    def recent(self, n: int) -> tuple[EventRecord, ...]:
        return self.events[:n]

    def counts(self, now_ms: int) -> dict[str, dict[str, int]]:
        """Events per type in each window ending at now_ms: {"1h": {"view": 3, ...}, "1d": {...}}."""
        out = {w: dict.fromkeys(EVENT_TYPES, 0) for w in COUNT_WINDOWS}
        for e in self.events:
            age = now_ms - e.ts_ms
            for w, span in COUNT_WINDOWS.items():
                if age < span:
                    out[w][e.event_type] += 1
        return out

    def merged(self, new: list[EventRecord], now_ms: int, settings: WindowSettings) -> Realtime:
        """The window after appending `new` (in arrival order): sorted newest first, then trimmed."""
        # Newest arrival first among equal timestamps, so a stable sort keeps the latest click on top.
        combined = sorted([*reversed(new), *self.events], key=lambda e: -e.ts_ms)
        kept = [e for pos, e in enumerate(combined) if pos < settings.keep_last or now_ms - e.ts_ms < DAY_MS][
            : max(settings.max_events, settings.keep_last)
        ]
        previous = [self.last_event_ts_ms] if self.last_event_ts_ms is not None else []
        last = max([e.ts_ms for e in new] + previous, default=None)
        return Realtime(events=tuple(kept), event_count=self.event_count + len(new), last_event_ts_ms=last)

    def columns(self) -> dict[str, object]:
        """The REALTIME_FEATURES values by name, as the push source takes them."""
        values = (
            [e.item_id for e in self.events],
            [e.event_type for e in self.events],
            [e.ts_ms for e in self.events],
            self.last_event_ts_ms,
            self.event_count,
        )
        return dict(zip(REALTIME_FEATURES, values, strict=True))
