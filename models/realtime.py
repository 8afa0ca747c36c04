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
    """Held as parallel columns, newest first: a heavy user's 1,000-event window decodes in well under 1 ms,
    and EventRecords are built only for the events a caller asks for."""

    item_ids: tuple[str, ...]
    event_types: tuple[str, ...]
    ts_ms: tuple[int, ...]
    event_count: int  # every event ever accepted for the user
    last_event_ts_ms: int | None

    @classmethod
    def empty(cls) -> Realtime:
        return cls((), (), (), event_count=0, last_event_ts_ms=None)

    @classmethod
    def of(cls, events: list[EventRecord], event_count: int, last_event_ts_ms: int | None) -> Realtime:
        return cls(
            tuple(e.item_id for e in events),
            tuple(e.event_type for e in events),
            tuple(e.ts_ms for e in events),
            event_count,
            last_event_ts_ms,
        )

    @classmethod
    def from_columns(cls, values: dict[str, object]) -> Realtime:
        """Inverse of `columns`; a user with no row (all None) gets the empty window."""
        ids, types, ts, last, count = (values.get(name) for name in REALTIME_FEATURES)
        ids, types, ts = tuple(ids or ()), tuple(types or ()), tuple(ts or ())  # type: ignore[call-overload]
        if not len(ids) == len(types) == len(ts):
            raise ValueError(f"event columns differ in length: {len(ids)}, {len(types)}, {len(ts)}")
        return cls(ids, types, ts, int(count or 0), None if last is None else int(last))  # type: ignore[call-overload]

    def __len__(self) -> int:
        return len(self.ts_ms)

    @property
    def events(self) -> tuple[EventRecord, ...]:
        return self.recent(len(self))

    def recent(self, n: int) -> tuple[EventRecord, ...]:
        return tuple(
            EventRecord(i, t, s)  # type: ignore[arg-type]
            for i, t, s in zip(self.item_ids[:n], self.event_types[:n], self.ts_ms[:n], strict=True)
        )

    def counts(self, now_ms: int) -> dict[str, dict[str, int]]:
        """Events per type in each window ending at now_ms: {"1h": {"view": 3, ...}, "1d": {...}}."""
        out = {w: dict.fromkeys(EVENT_TYPES, 0) for w in COUNT_WINDOWS}
        for kind, ts in zip(self.event_types, self.ts_ms, strict=True):
            age = now_ms - ts
            for w, span in COUNT_WINDOWS.items():
                if age < span:
                    out[w][kind] += 1
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
        return Realtime.of(kept, self.event_count + len(new), last)

    def columns(self) -> dict[str, object]:
        """The REALTIME_FEATURES values by name, as the push source takes them."""
        values = (
            list(self.item_ids),
            list(self.event_types),
            list(self.ts_ms),
            self.last_event_ts_ms,
            self.event_count,
        )
        return dict(zip(REALTIME_FEATURES, values, strict=True))
