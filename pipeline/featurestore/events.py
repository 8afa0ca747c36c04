"""Real-time events: validate a batch, then write each user's new event window through Feast's push path.

A push replaces the user's whole row, so a write is read-modify-write. A short per-user lock in Redis makes it
safe under concurrent writers (several ingress replicas, many clients): no event is lost or counted twice.
Each push is stamped strictly later than the row it replaces, because Feast's Redis store skips a write whose
timestamp is not newer than the stored one. Every row pushed is first appended to the event log
(pipeline/featurestore/eventlog.py), so accepted events survive a total loss of Redis's data.

An event may carry the client's `event_id`. A repeat of one already stored for the same user within
`event_id_retention_s` (24 h by default) is accepted and not stored again (`EventIds`), so a client may retry a
batch whose answer it never got.

`FeatureStore.push` re-reads the registry on every call (about 20 ms of Python here). The writer resolves the
push source's feature views once and hands each batch to the same provider write that `push` ends in;
tests/pipeline/featurestore/test_events.py proves the stored bytes equal what `push` stores.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import random
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
from feast.infra.provider import get_provider
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.type_map import python_values_to_proto_values
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from feature_repo import definitions as defs
from models.errors import FeatureStoreError, InvalidEventError, WriteConflictError
from models.features import EVENT_TIMESTAMP, USER_KEY
from models.realtime import EVENT_TYPES, EventRecord, Realtime, WindowSettings
from pipeline.edge.schemas import NON_BLANK, Event
from pipeline.featurestore.eventlog import EventLog
from pipeline.featurestore.store import (
    REDIS_ERRORS,
    RELEASE_LOCK,
    REPLACED_TS_NS,
    event_lock_key,
    fast_retry,
    read_realtime,
    redis_client,
    unavailable,
)
from settings import StoreSettings

if TYPE_CHECKING:
    from feast import FeatureStore

MAX_FUTURE = dt.timedelta(minutes=5)
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


__all__ = ["Event", "EventIds", "EventSettings", "EventWriter", "validate_events"]


class EventSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch: int = Field(500, ge=1, le=10_000, description="events per call")
    allow_new_items: bool = Field(False, description="accept item ids outside the bundle's catalog")
    keep_last: int = Field(50, ge=1, le=1000, description="newest events kept whatever their age")
    max_events: int = Field(1000, ge=1, le=100_000, description="events kept for the last day's counts")
    lock_ttl_ms: int = Field(5000, ge=100, description="a crashed writer's lock frees itself after this")
    lock_wait_ms: int = Field(5000, ge=10, description="how long a writer waits for a user's lock")
    event_id_retention_s: int = Field(
        86_400,
        ge=1,
        le=30 * 86_400,
        description="a repeated event_id within this long of the first is accepted and counted once; after it, "
        "the id is forgotten and the event counts again",
    )

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
        return field, (
            "is not a field of an event: send user_id, item_id, event_type and optionally timestamp and event_id"
        )
    if kind == "string_pattern_mismatch" and first.get("ctx", {}).get("pattern") == NON_BLANK:
        return field, "is only whitespace: send the id"
    if kind == "literal_error":
        return field, f"{first.get('input')!r} is not one of {', '.join(EVENT_TYPES)}"
    if kind == "string_type":
        return field, f'must be a string (ids are text, e.g. "12347"), got {type(first.get("input")).__name__}'
    if kind == "value_error":
        return field, str(first.get("ctx", {}).get("error", first["msg"]))
    return field, first["msg"]


def validate_events(
    raw: Any, known_items: frozenset[str] | set[str], settings: EventSettings, now: dt.datetime | None = None
) -> list[Event]:
    """Parse and check a batch; the first bad event raises InvalidEventError naming its index and field. Ids come
    back normalized as the data is cleaned (models/data.py: trimmed, stock codes upper-case)."""
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
    repeats: int = 0  # accepted events whose event_id was already stored: not stored again
    # Per user, the events this call stored (repeats left out), in the batch's order: what outcomes attribute.
    stored: dict[str, list[EventRecord]] = field(default_factory=dict)


def event_id_key(project: str, user_id: str, event_id: str) -> str:
    """One stored event id of one user; it holds the Feast stamp (ns) of the row that carried the event."""
    # The user id's length first: ids may hold ':', and no (user, event id) pair may read as another.
    return f"recserve:{project}:event-id:{len(user_id)}:{user_id}:{event_id}"


def event_ids_pending_key(project: str, user_id: str) -> str:
    """The ids of a user's write in progress: event id -> the stamp (ns) its row will carry."""
    return f"recserve:{project}:event-ids-pending:{user_id}"


class EventIds:
    """The event ids stored per user, in Redis, each for `retention_s` (SET with a TTL).

    All of it runs under the users' write locks. A write records its ids, and a pending note per user, before its
    push and removes the note once the push has landed. A writer that dies in between leaves the note, and the
    next write for that user (typically the client's retry) settles it against the stored row's stamp: the dead
    write's row landed if and only if the stored stamp is at least the noted one, since no other write can have
    come in between. Landed: its ids stay, and the retry's events count as repeats. Not landed: its ids are
    dropped, and the retry stores the events. A retry after a crash neither loses an event nor counts it twice."""

    def __init__(self, client: redis.Redis, project: str, retention_s: int) -> None:
        self.client = client
        self.project = project
        self.retention_s = retention_s

    def stored(self, current: dict[str, tuple[Realtime, int]], wanted: dict[str, list[str]]) -> set[tuple[str, str]]:
        """Settle what a dead writer left for the users of `current` (each user's window and stored stamp), then
        return the (user, event id) pairs of `wanted` already stored. One round trip, two after a crash."""
        users = list(current)
        pairs = [(u, e) for u, ids in wanted.items() for e in ids]
        with self.client.pipeline(transaction=False) as pipe:
            for u in users:
                pipe.hgetall(event_ids_pending_key(self.project, u))
            for u, e in pairs:
                pipe.exists(event_id_key(self.project, u, e))
            replies = pipe.execute()
        found = {pair for pair, hit in zip(pairs, replies[len(users) :], strict=True) if hit}
        notes = {u: n for u, n in zip(users, replies[: len(users)], strict=True) if n}
        if not notes:
            return found
        dropped = set()
        with self.client.pipeline(transaction=False) as pipe:
            for u, note in notes.items():
                for raw_id, raw_stamp in note.items():
                    if current[u][1] < int(raw_stamp):  # that row never landed: its events were not stored
                        event_id = raw_id.decode()
                        pipe.delete(event_id_key(self.project, u, event_id))
                        dropped.add((u, event_id))
                pipe.delete(event_ids_pending_key(self.project, u))
            pipe.execute()
        return found - dropped

    def record(self, ids: dict[str, tuple[int, list[str]]]) -> None:
        """Before the push: each user's new ids with the stamp (ns) of the row that carries them, and the note."""
        with self.client.pipeline(transaction=False) as pipe:
            for u, (stamp, event_ids) in ids.items():
                pending = event_ids_pending_key(self.project, u)
                pipe.hset(pending, mapping=dict.fromkeys(event_ids, stamp))
                pipe.expire(pending, self.retention_s)
                for e in event_ids:
                    pipe.set(event_id_key(self.project, u, e), stamp, ex=self.retention_s)
            pipe.execute()

    def landed(self, users: Sequence[str]) -> None:
        """After the push: the notes go. Should Redis fail here, the next write settles them as landed."""
        with contextlib.suppress(*REDIS_ERRORS), self.client.pipeline(transaction=False) as pipe:
            for u in users:
                pipe.delete(event_ids_pending_key(self.project, u))
            pipe.execute()

    def failed(self, ids: dict[str, tuple[int, list[str]]]) -> None:
        """The push failed: take the ids and notes back. Should Redis fail here, the next write drops them."""
        with contextlib.suppress(*REDIS_ERRORS), self.client.pipeline(transaction=False) as pipe:
            for u, (_, event_ids) in ids.items():
                pipe.delete(
                    event_ids_pending_key(self.project, u), *[event_id_key(self.project, u, e) for e in event_ids]
                )
            pipe.execute()


def _ns(ts: dt.datetime) -> int:
    # Exactly what Feast stores as the row's stamp (seconds and nanos of a protobuf Timestamp), read back by
    # store.decode_ts_ns: integer arithmetic, since a float of ns since 1970 loses the last digits.
    return (ts - EPOCH) // dt.timedelta(microseconds=1) * 1000


class _Batch:
    """One write's events per user, less the repeats: an event_id seen earlier in the batch or stored already."""

    def __init__(self, window: WindowSettings) -> None:
        self.window = window
        self.events: dict[str, list[tuple[EventRecord, str | None]]] = {}
        self.fresh: dict[str, list[EventRecord]] = {}
        self.new_ids: dict[str, list[str]] = {}

    def add(self, user: str, record: EventRecord, event_id: str | None) -> None:
        self.events.setdefault(user, []).append((record, event_id))

    @property
    def ids(self) -> dict[str, list[str]]:
        """Each user's event ids in the batch, once each."""
        out = {u: list(dict.fromkeys(e for _, e in evs if e is not None)) for u, evs in self.events.items()}
        return {u: ids for u, ids in out.items() if ids}

    def drop_repeats(self, stored: set[tuple[str, str]]) -> None:
        self.fresh, self.new_ids = {}, {}
        for u, evs in self.events.items():
            seen = {e for user, e in stored if user == u}
            for record, event_id in evs:
                if event_id is not None:
                    if event_id in seen:
                        continue
                    seen.add(event_id)
                    self.new_ids.setdefault(u, []).append(event_id)
                self.fresh.setdefault(u, []).append(record)

    @property
    def stored(self) -> int:
        return sum(map(len, self.fresh.values()))

    def append(self, current: dict[str, tuple[Realtime, int]], now_ms: int) -> dict[str, Realtime]:
        """A Change: the fresh events merged into their users' windows; users with none stay as they are."""
        return {u: current[u][0].merged(records, now_ms, self.window) for u, records in self.fresh.items()}


class EventWriter:
    """Writes validated events; an error means nothing of that call was written, so the caller may retry."""

    def __init__(self, store: FeatureStore, store_settings: StoreSettings, settings: EventSettings) -> None:
        self.store = store
        self.store_settings = store_settings
        self.settings = settings
        self.client = redis_client(store_settings)
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
        """Append the events to their users' windows; an event whose event_id the user already stored within
        the retention window is accepted and not stored again (a repeat). Raises StoreUnavailableError (nothing of
        the call was stored, though a part may be when the connection broke mid-push) or WriteConflictError; both
        retryable, and a retry with event ids is safe."""
        batch = _Batch(self.settings.window)
        for e in events:
            assert e.timestamp is not None  # validate_events fills it
            batch.add(e.user_id, EventRecord(e.item_id, e.event_type, _ms(e.timestamp)), e.event_id)
        self.update(list(batch.events), batch.append, batch)
        return WriteResult(
            accepted=len(events), users=len(batch.events), repeats=len(events) - batch.stored, stored=batch.fresh
        )

    def update(self, users: Sequence[str], change: Change, batch: _Batch | None = None) -> int:
        """Read-modify-write the users' windows under their locks: log the changed rows, then push them.
        Returns the rows written. Raises StoreUnavailableError or WriteConflictError, both retryable.

        A `batch` of events learns which of its event ids are stored already before `change` runs, and its new ids
        are recorded with their rows (EventIds). Every update settles what a dead writer left for its users, so
        those ids are right before anyone asks."""
        ledger = EventIds(self.client, self.store_settings.project, self.settings.event_id_retention_s)
        try:
            with self._locked(users):
                current = read_realtime(self.client, self.store_settings.project, users)
                stored_ids = ledger.stored(current, batch.ids if batch else {})
                if batch:
                    batch.drop_repeats(stored_ids)
                now = dt.datetime.now(dt.UTC)
                changed = change(current, _ms(now))
                rows = []
                for u, window in changed.items():
                    stored_ns = current[u][1]
                    # Strictly newer than the stored row, or Feast would skip this write.
                    stamp = max(now, dt.datetime.fromtimestamp((stored_ns + 1000) / 1e9, dt.UTC))
                    rows.append({USER_KEY: u, EVENT_TIMESTAMP: stamp, **window.columns(), REPLACED_TS_NS: stored_ns})
                if rows:
                    stamps = {r[USER_KEY]: _ns(r[EVENT_TIMESTAMP]) for r in rows}
                    noted = {u: (stamps[u], ids) for u, ids in (batch.new_ids if batch else {}).items()}
                    if noted:
                        ledger.record(noted)
                    try:
                        self._log_and_push(rows)
                    except BaseException:
                        ledger.failed(noted)
                        raise
                    ledger.landed(list(noted))
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
