"""Real-time events: validate a batch, then write each user's new event window through Feast's push path.

A push replaces the user's whole row, so a write is read-modify-write. A short per-user lock in Redis makes it
safe under concurrent writers (several ingress replicas, many clients): no event is lost or counted twice.
Each push is stamped strictly later than the row it replaces, because Feast's Redis store skips a write whose
timestamp is not newer than the stored one. Every row pushed is first appended to the event log
(pipeline/eventlog.py), so accepted events survive a total loss of Redis's data.

`FeatureStore.push` re-reads the registry on every call (about 20 ms of Python here). The writer resolves the
push source's feature views once and hands each batch to the same provider write that `push` ends in;
tests/pipeline/test_events.py proves the stored bytes equal what `push` stores.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import random
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from feast.infra.provider import get_provider
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.type_map import python_values_to_proto_values
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from feature_repo import definitions as defs
from models.errors import FeatureStoreError, InvalidEventError, WriteConflictError
from models.features import EVENT_TIMESTAMP, USER_KEY
from models.realtime import EVENT_TYPES, EventRecord, EventType, Realtime, WindowSettings
from pipeline.eventlog import EventLog
from pipeline.store import (
    REDIS_ERRORS,
    RELEASE_LOCK,
    REPLACED_TS_NS,
    StoreSettings,
    event_lock_key,
    fast_retry,
    read_realtime,
    unavailable,
)

if TYPE_CHECKING:
    from feast import FeatureStore

MAX_FUTURE = dt.timedelta(minutes=5)


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    user_id: StrictStr = Field(min_length=1, max_length=64, examples=["12347"])
    item_id: StrictStr = Field(min_length=1, max_length=64, examples=["85123A"])
    event_type: EventType = Field(examples=["view"])
    timestamp: dt.datetime | None = Field(None, description="ISO 8601; UTC when no zone is given; default: now")


class EventSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch: int = Field(500, ge=1, le=10_000, description="events per call")
    allow_new_items: bool = Field(False, description="accept item ids outside the bundle's catalog")
    keep_last: int = Field(50, ge=1, le=1000, description="newest events kept whatever their age")
    max_events: int = Field(1000, ge=1, le=100_000, description="events kept for the last day's counts")
    lock_ttl_ms: int = Field(5000, ge=100, description="a crashed writer's lock frees itself after this")
    lock_wait_ms: int = Field(5000, ge=10, description="how long a writer waits for a user's lock")

    @property
    def window(self) -> WindowSettings:
        return WindowSettings(keep_last=self.keep_last, max_events=self.max_events)


def _field_error(exc: ValidationError) -> tuple[str, str]:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "event"
    kind = first["type"]
    if kind == "missing":
        return field, "is required"
    if kind == "extra_forbidden":
        return field, "is not a field of an event: send user_id, item_id, event_type and optionally timestamp"
    if kind == "literal_error":
        return field, f"{first.get('input')!r} is not one of {', '.join(EVENT_TYPES)}"
    if kind == "string_type":
        return field, f'must be a string (ids are text, e.g. "12347"), got {type(first.get("input")).__name__}'
    return field, first["msg"]


def validate_events(
    raw: Any, known_items: frozenset[str] | set[str], settings: EventSettings, now: dt.datetime | None = None
) -> list[Event]:
    """Parse and check a batch; the first bad event raises InvalidEventError naming its index and field."""
    now = now or dt.datetime.now(dt.UTC)
    if not isinstance(raw, list):
        raise InvalidEventError(None, "events", f"must be a list of events, got {type(raw).__name__}")
    if not raw:
        raise InvalidEventError(None, "events", "is empty: send at least one event")
    if len(raw) > settings.max_batch:
        raise InvalidEventError(
            None, "events", f"holds {len(raw)} events; the limit is {settings.max_batch}: split the batch"
        )
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise InvalidEventError(i, "event", f"must be an object, got {type(item).__name__}")
        try:
            event = Event.model_validate(item)
        except ValidationError as exc:
            raise InvalidEventError(i, *_field_error(exc)) from None
        ts = event.timestamp
        if ts is not None:
            ts = ts if ts.tzinfo else ts.replace(tzinfo=dt.UTC)
            if ts - now > MAX_FUTURE:
                raise InvalidEventError(
                    i, "timestamp", f"{ts.isoformat()} is more than 5 minutes in the future: send UTC, or omit it"
                )
            event = event.model_copy(update={"timestamp": ts})
        else:
            event = event.model_copy(update={"timestamp": now})
        if not settings.allow_new_items and event.item_id not in known_items:
            raise InvalidEventError(
                i, "item_id", f"{event.item_id!r} is not in the catalog (new items are not allowed by this deployment)"
            )
        out.append(event)
    return out


def _ms(ts: dt.datetime) -> int:
    return int(ts.timestamp() * 1000)


# What a write does to the locked users' windows: given each user's stored window and its Feast stamp (ns; 0
# when the store has no row) and the time (ms), the new windows of the users to write; users left out stay.
Change = Callable[[dict[str, tuple[Realtime, int]], int], dict[str, Realtime]]


@dataclass
class WriteResult:
    accepted: int
    users: int


class EventWriter:
    """Writes validated events; an error means nothing of that call was written, so the caller may retry."""

    def __init__(self, store: FeatureStore, store_settings: StoreSettings, settings: EventSettings) -> None:
        self.store = store
        self.store_settings = store_settings
        self.settings = settings
        self.client = store_settings.client()
        self._release = self.client.register_script(RELEASE_LOCK)
        self.log = EventLog(store_settings, self.client)
        self._views = [
            fv
            for fv in store.list_feature_views()
            if fv.stream_source is not None and fv.stream_source.name == defs.PUSH_SOURCE
        ]
        if not self._views:
            raise FeatureStoreError(
                f"no feature view reads push source {defs.PUSH_SOURCE!r} in project {store_settings.project}: "
                "run `recserve features apply`"
            )
        self._provider = get_provider(store.config)
        feast_client = self._provider.online_store._get_client(store.config.online_store)
        if isinstance(feast_client, redis.Redis):
            # Feast's client keeps redis-py's default retries (up to ~7 s of backoff), longer than a user lock
            # lives: a push retried after another writer took the lock would carry an older stamp, and Feast
            # would skip it silently after this write had answered 202. Fail fast instead, then 503.
            feast_client.set_retry(fast_retry())

    @contextmanager
    def _locked(self, users: Sequence[str]) -> Iterator[None]:
        # Sorted order: two writers locking overlapping users can never wait on each other in a cycle.
        token = uuid.uuid4().hex
        held: list[str] = []
        deadline = time.monotonic() + self.settings.lock_wait_ms / 1000
        try:
            for u in sorted(users):
                key = event_lock_key(self.store_settings.project, u)
                attempt = 0
                while not self.client.set(key, token, nx=True, px=self.settings.lock_ttl_ms):
                    if time.monotonic() > deadline:
                        raise WriteConflictError(
                            f"user {u!r}'s events are locked by another writer for over "
                            f"{self.settings.lock_wait_ms} ms: retry the batch"
                        )
                    # Jittered backoff, capped at 20 ms: waiters that spin tightly slow the holder down.
                    time.sleep(random.uniform(0.5, 1.5) * min(0.001 * 2**attempt, 0.02))
                    attempt += 1
                held.append(key)
            yield
        finally:
            for key in held:
                # On failure the lock expires by itself after lock_ttl_ms.
                with contextlib.suppress(*REDIS_ERRORS):
                    self._release(keys=[key], args=[token])

    def write(self, events: Sequence[Event]) -> WriteResult:
        """Append the events to their users' windows. Raises StoreUnavailableError (nothing of the call was
        stored, though a part may be when the connection broke mid-push) or WriteConflictError; both retryable."""
        by_user: dict[str, list[EventRecord]] = {}
        for e in events:
            assert e.timestamp is not None  # validate_events fills it
            by_user.setdefault(e.user_id, []).append(EventRecord(e.item_id, e.event_type, _ms(e.timestamp)))
        window = self.settings.window

        def append(current: dict[str, tuple[Realtime, int]], now_ms: int) -> dict[str, Realtime]:
            return {u: stored.merged(by_user[u], now_ms, window) for u, (stored, _) in current.items()}

        self.update(list(by_user), append)
        return WriteResult(accepted=len(events), users=len(by_user))

    def update(self, users: Sequence[str], change: Change) -> int:
        """Read-modify-write the users' windows under their locks: log the changed rows, then push them.
        Returns the rows written. Raises StoreUnavailableError or WriteConflictError, both retryable."""
        try:
            with self._locked(users):
                current = read_realtime(self.client, self.store_settings.project, users)
                now = dt.datetime.now(dt.UTC)
                changed = change(current, _ms(now))
                rows = []
                for u, window in changed.items():
                    stored_ns = current[u][1]
                    # Strictly newer than the stored row, or Feast would skip this write.
                    stamp = max(now, dt.datetime.fromtimestamp((stored_ns + 1000) / 1e9, dt.UTC))
                    rows.append({USER_KEY: u, EVENT_TIMESTAMP: stamp, **window.columns(), REPLACED_TS_NS: stored_ns})
                if rows:
                    self._log_and_push(rows)
        except REDIS_ERRORS as exc:
            raise unavailable(self.store_settings, exc) from None
        return len(rows)

    def _log_and_push(self, rows: list[dict[str, Any]]) -> None:
        # Log first: a row in the store is always in the log. A failed push takes its entries back (while the
        # user locks are held, so the flusher has not taken them yet); a 503 then leaves no logged-but-unstored
        # row, unless Redis is gone for the XDEL too.
        ids = self.log.append(rows)
        try:
            self.push_rows(rows)
        except BaseException:
            self.log.discard(ids)
            raise

    def push_rows(self, rows: list[dict[str, Any]]) -> None:
        """What `store.push(PUSH_SOURCE, DataFrame(rows))` stores, without its per-call registry reads."""
        for view in self._views:
            values = {
                f.name: python_values_to_proto_values([r[f.name] for r in rows], f.dtype.to_value_type())
                for f in view.features
            }
            data = [
                (
                    EntityKeyProto(join_keys=[USER_KEY], entity_values=[ValueProto(string_val=r[USER_KEY])]),
                    {name: column[i] for name, column in values.items()},
                    r[EVENT_TIMESTAMP],
                    None,
                )
                for i, r in enumerate(rows)
            ]
            self._provider.online_write_batch(self.store.config, view, data, None)
