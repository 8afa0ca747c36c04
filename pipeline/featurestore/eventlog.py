"""The durable event log: every row the event writer pushes is also kept, first in a Redis stream, then in hourly
parquet files that are the push source's offline twin (Feast's FileSource reads them).

    POST /events ─ EventWriter: under the user locks, XADD the rows to `recserve:<project>:event-log`, then push
    flusher      ─ every `event_log_flush_s` (2 s): stream → `<event_log_dir>/user_events-<YYYYMMDDHH>.parquet`
                   (UTC hour of the row's event_timestamp), each file rewritten atomically, then XTRIM
    recovery     ─ `rebuild_realtime`: each user's last logged window, merged with what the store holds now

What a loss costs. Redis runs append-only with `appendfsync everysec` (deploy/ensure-redis.sh): a Redis crash
or restart loses nothing; an OS crash or power loss loses up to ~1 s of acknowledged writes, the stream's too.
A total loss of Redis's data loses the stream's unflushed part: at most `event_log_flush_s` of accepted events
(plus a flush's own duration); everything older is in the files, and `rebuild_realtime` puts it back.

Exactly once in the files, across a crash anywhere: stream ids grow with Redis's clock (after a wipe too, unless
the clock steps back), each flush reads a prefix of the stream, and every hour file is rewritten whole. So an
entry whose id is at most the highest id in its hour's file is already there, and is skipped; the stream is
trimmed only after the files are durable. One flusher runs at a time across replicas, under a Redis lease.

A row names the Feast stamp of the row it replaced (`replaced_ts_ns`, 0 when the store had none): after a total
loss, the first write of a user starts a new lineage (0 again), which is how the rebuild tells the lost state
(the newest row before that) from what was written since.

Limits. A flush rewrites its hour's whole file: about 1 s per flush once an hour holds 100,000 rows of 50-event
windows (measured on this machine); past that rate, write a part file per flush and compact each hour once it
is over. Where Redis vanishes between a write's XADD and its push, the entry stays (the XDEL cannot reach it):
the log then holds a row the store never took, which matters only if it is the user's newest at a rebuild.
The lease keeps a second flusher out only while a flush takes less than the lease (15 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import redis

from models.errors import RecserveError
from models.features import EVENT_TIMESTAMP, REALTIME_FEATURES, USER_KEY
from models.realtime import Realtime, WindowSettings
from pipeline.featurestore.store import (
    REDIS_ERRORS,
    RELEASE_LOCK,
    REPLACED_TS_NS,
    STREAM_ID,
    ensure_event_log,
    event_lock_key,
    event_log_schema,
    redis_client,
    unavailable,
)
from settings import StoreSettings

if TYPE_CHECKING:
    from pipeline.featurestore.events import EventWriter

log = logging.getLogger("recserve")

ROW_FIELD = "row"  # the stream entry's one field: the row as compact JSON
HOUR_FILE = re.compile(r"^user_events-(\d{10})\.parquet$")
MAX_ID_META = b"recserve.max_stream_id"
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
US = dt.timedelta(microseconds=1)

# Acquire, or renew when ours, in one step.
_HOLD = """
local v = redis.call('get', KEYS[1])
if v == ARGV[1] then redis.call('pexpire', KEYS[1], ARGV[2]) return 1 end
if not v then redis.call('set', KEYS[1], ARGV[1], 'px', ARGV[2]) return 1 end
return 0
"""


def stream_key(project: str) -> str:
    return f"recserve:{project}:event-log"


def lease_key(project: str) -> str:
    return f"recserve:{project}:event-log:flusher"


@dataclass(frozen=True, order=True)
class StreamId:
    """A Redis stream entry id, `<ms>-<seq>`, ordered as Redis orders them (not as strings sort)."""

    ms: int
    seq: int

    @classmethod
    def parse(cls, raw: bytes | str) -> StreamId:
        text = raw.decode() if isinstance(raw, bytes) else raw
        ms, _, seq = text.partition("-")
        return cls(int(ms), int(seq or 0))

    def next(self) -> StreamId:
        return StreamId(self.ms, self.seq + 1)

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"


NO_ID = StreamId(-1, 0)


def encode_row(row: dict[str, Any]) -> str:
    """One pushed row (user_id, event_timestamp as a datetime, the rt_* columns, replaced_ts_ns) as compact JSON,
    with event_timestamp in whole microseconds since the epoch."""
    values = {USER_KEY: row[USER_KEY], EVENT_TIMESTAMP: (row[EVENT_TIMESTAMP] - EPOCH) // US}
    values |= {name: row[name] for name in REALTIME_FEATURES}
    values[REPLACED_TS_NS] = int(row.get(REPLACED_TS_NS, 0))
    return json.dumps(values, separators=(",", ":"))


def decode_entry(entry_id: bytes | str, fields: dict[bytes, bytes]) -> dict[str, Any]:
    """A stream entry as a row of the files' schema (event_timestamp still in microseconds)."""
    row = json.loads(fields[ROW_FIELD.encode()])
    row[STREAM_ID] = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return row


def rows_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """Decoded rows as a table of the files' schema, in the order given."""
    schema = event_log_schema()
    return pa.Table.from_pydict({f.name: pa.array([r[f.name] for r in rows], type=f.type) for f in schema}, schema)


def window_of(row: dict[str, Any]) -> Realtime:
    return Realtime.from_columns({name: row.get(name) for name in REALTIME_FEATURES})


def _hour(ts_us: int) -> str:
    return (EPOCH + ts_us * US).strftime("%Y%m%d%H")


def _max_id(table: pa.Table | None) -> StreamId:
    if table is None or table.num_rows == 0:
        return NO_ID
    meta = table.schema.metadata or {}
    if MAX_ID_META in meta:
        return StreamId.parse(meta[MAX_ID_META])
    return max(StreamId.parse(s) for s in table.column(STREAM_ID).to_pylist())


def _write_atomically(table: pa.Table, path: Path) -> None:
    """Readers see the old file or the new one, never a part; once this returns, the new one survives a crash."""
    # A leading dot and no .parquet ending: neither pyarrow's nor Feast's (dask's) directory reader takes it.
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        pq.write_table(table, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself
    finally:
        os.close(fd)


class EventLog:
    """One project's event log: the writer's append (on the request path), the flusher and the files.

    The writer's part costs one pipelined round trip per write. The flusher's part (`flush_once`,
    `run_flusher`) does blocking file and Redis work; run it off the event loop, as `run_flusher` does."""

    def __init__(
        self,
        settings: StoreSettings,
        client: redis.Redis | None = None,
        batch_rows: int = 5000,
        lease_ms: int | None = None,
    ) -> None:
        self.settings = settings
        self.client = client or redis_client(settings)
        self.key = stream_key(settings.project)
        self.dir = Path(settings.event_log_dir)
        self.batch_rows = batch_rows
        # Renewed before every batch; long enough that a slow disk does not lose it mid-flush, short enough that
        # a dead holder's replica is replaced within seconds.
        self.lease_ms = lease_ms or max(15_000, int(settings.event_log_flush_s * 5000))
        self._token = uuid.uuid4().hex
        self._hold = self.client.register_script(_HOLD)
        self._release = self.client.register_script(RELEASE_LOCK)

    # -- the writer's side ---------------------------------------------------------------------------------

    def append(self, rows: Sequence[dict[str, Any]]) -> list[bytes]:
        """XADD each row (in one pipeline); returns the entry ids. Raises REDIS_ERRORS."""
        with self.client.pipeline(transaction=False) as pipe:
            for row in rows:
                pipe.xadd(self.key, {ROW_FIELD: encode_row(row)})
            return pipe.execute()

    def discard(self, ids: Sequence[bytes]) -> None:
        """Best effort: take back entries whose push failed. Where Redis is gone too, they stay (see README)."""
        if ids:
            with contextlib.suppress(*REDIS_ERRORS):
                self.client.xdel(self.key, *ids)

    def backlog(self) -> int:
        """Entries not yet flushed to the files."""
        return int(self.client.xlen(self.key))

    # -- the flusher ----------------------------------------------------------------------------------------

    def holds_lease(self) -> bool:
        """Take the flusher lease, or renew it when this log holds it already."""
        return bool(self._hold(keys=[lease_key(self.settings.project)], args=[self._token, self.lease_ms]))

    def release(self) -> None:
        with contextlib.suppress(*REDIS_ERRORS):
            self._release(keys=[lease_key(self.settings.project)], args=[self._token])

    def flush_once(self) -> int:
        """Move every settled stream entry to the hourly files; returns the rows newly written.

        0 when another replica holds the flusher lease. An entry is settled once its user's write lock is free:
        a writer whose push fails takes its entries back under that lock. Raises StoreUnavailableError when
        Redis does not answer, OSError when the directory cannot be written; either way nothing is lost, and
        the next flush carries on."""
        try:
            written = 0
            while self.holds_lease():
                entries = self.client.xrange(self.key, "-", "+", count=self.batch_rows)
                rows = self._settled([decode_entry(i, f) for i, f in entries])
                if rows:
                    written += self.write_files(rows)
                    # The files hold every entry up to the last one now. Entries added since the XRANGE have
                    # larger ids, so an exact MINID trim never takes one that is not in a file.
                    last = StreamId.parse(rows[-1][STREAM_ID])
                    self.client.xtrim(self.key, minid=str(last.next()), approximate=False)
                if len(rows) < self.batch_rows:
                    break
            return written
        except REDIS_ERRORS as exc:
            raise unavailable(self.settings, exc) from None

    def _settled(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The longest prefix whose users' write locks are free (a prefix, so the trim stays exact)."""
        users = sorted({r[USER_KEY] for r in rows})
        for _ in range(20):
            with self.client.pipeline(transaction=False) as pipe:
                for u in users:
                    pipe.exists(event_lock_key(self.settings.project, u))
                locked = {u for u, held in zip(users, pipe.execute(), strict=True) if held}
            cut = next((i for i, r in enumerate(rows) if r[USER_KEY] in locked), len(rows))
            if cut > 0 or not rows:
                return rows[:cut]
            time.sleep(0.005)  # the first entry's writer is still at work: a write takes a few ms
        return []

    def write_files(self, rows: Sequence[dict[str, Any]]) -> int:
        """Add decoded rows (stream order) to their hour files, skipping any a file holds already; returns the
        rows added. Each file is replaced atomically and fsynced, directory included."""
        ensure_event_log(self.dir)
        by_hour: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_hour.setdefault(_hour(row[EVENT_TIMESTAMP]), []).append(row)
        added = 0
        for hour, group in sorted(by_hour.items()):
            path = self.dir / f"user_events-{hour}.parquet"
            old = pq.read_table(path) if path.is_file() else None
            done = _max_id(old)
            new = [r for r in group if StreamId.parse(r[STREAM_ID]) > done]
            if not new:
                continue
            table = rows_table(new)
            if old is not None:
                table = pa.concat_tables([old.replace_schema_metadata(None), table])
            top = max(done, StreamId.parse(new[-1][STREAM_ID]))
            _write_atomically(table.replace_schema_metadata({MAX_ID_META: str(top).encode()}), path)
            added += len(new)
        return added

    async def run_flusher(self, stop: asyncio.Event, interval_s: float | None = None) -> None:
        """Flush every `interval_s` (default: the settings' event_log_flush_s) until `stop` is set, then once
        more, and release the lease. Blocking work runs in a thread; a failed flush is logged and retried."""
        interval = interval_s or self.settings.event_log_flush_s
        try:
            while True:
                try:
                    await asyncio.to_thread(self.flush_once)
                except (RecserveError, OSError) as exc:
                    log.warning("event log flush failed (%s); retrying in %.1f s", exc, interval)
                if stop.is_set():
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)
        finally:
            await asyncio.to_thread(self.release)

    # -- the files ------------------------------------------------------------------------------------------

    def hour_files(self) -> list[Path]:
        """The hourly files, oldest hour first (the empty schema file is not one)."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if HOUR_FILE.match(p.name))

    def read_files(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """Every flushed row (or the given columns), file by file."""
        tables = [pq.read_table(p, columns=columns) for p in self.hour_files()]
        schema = event_log_schema()
        if columns is not None:
            schema = pa.schema([schema.field(c) for c in columns])
        return pa.concat_tables([t.replace_schema_metadata(None) for t in tables] or [schema.empty_table()]).to_pandas()

    def stream_rows(self, after: StreamId | None = None) -> list[dict[str, Any]]:
        """The stream's entries (those after `after`, when given), decoded, oldest first. Raises REDIS_ERRORS."""
        out: list[dict[str, Any]] = []
        start = f"({after}" if after is not None and after != NO_ID else "-"
        while True:
            entries = self.client.xrange(self.key, start, "+", count=self.batch_rows)
            out += [decode_entry(i, f) for i, f in entries]
            if len(entries) < self.batch_rows:
                return out
            start = f"({entries[-1][0].decode()}"


def _as_row(record: dict[str, Any]) -> dict[str, Any]:
    """A file row as `decode_entry` gives a stream row (event_timestamp in microseconds)."""
    return record | {EVENT_TIMESTAMP: (record[EVENT_TIMESTAMP] - EPOCH) // US}


Ref = tuple[str, int] | dict[str, Any]  # (hour file, row position), or a decoded stream row


class Lineages:
    """Per user, from the files and the stream: the newest logged row, and the newest row before the user's
    latest lineage start (a row that replaced nothing). When the store holds a row for the user after a loss,
    that start is the user's first write since, and the row before it is the lost state.

    Rows are referenced, and read in bulk (`rows`) only for the users a rebuild is at."""

    def __init__(self, log: EventLog) -> None:
        self.log = log
        self.newest: dict[str, Ref] = {}
        self.before: dict[str, Ref] = {}
        self.last = NO_ID

    def load(self) -> Lineages:
        # The stream first: an entry flushed in between is then in both (the file's copy wins), never in neither.
        streamed = self.log.stream_rows()
        cols = [USER_KEY, STREAM_ID, REPLACED_TS_NS]
        frames = []
        for path in self.log.hour_files():
            frame = pq.read_table(path, columns=cols).to_pandas()
            frames.append(frame.assign(file=str(path), pos=range(len(frame))))
        frames.append(
            pd.DataFrame({c: [r[c] for r in streamed] for c in cols}, columns=cols).assign(
                file=None, pos=range(len(streamed))
            )
        )
        index = pd.concat(frames, ignore_index=True).drop_duplicates(STREAM_ID)
        if index.empty:
            return self
        ids = index[STREAM_ID].str.split("-", n=1, expand=True).astype("int64")
        index = index.assign(ms=ids[0], seq=ids[1]).sort_values(["ms", "seq"], kind="stable")

        def ref(row: Any) -> Ref:
            return (row.file, row.pos) if isinstance(row.file, str) else streamed[row.pos]

        for row in index.groupby(USER_KEY).tail(1).itertuples():
            self.newest[getattr(row, USER_KEY)] = ref(row)
        starts = index[index[REPLACED_TS_NS] == 0].groupby(USER_KEY).tail(1)
        starts = starts.set_index(USER_KEY)[["ms", "seq"]].rename(columns={"ms": "start_ms", "seq": "start_seq"})
        joined = index.join(starts, on=USER_KEY, how="inner")
        earlier = (joined["ms"] < joined["start_ms"]) | (
            (joined["ms"] == joined["start_ms"]) & (joined["seq"] < joined["start_seq"])
        )
        for row in joined[earlier].groupby(USER_KEY).tail(1).itertuples():
            self.before[getattr(row, USER_KEY)] = ref(row)
        last = index.iloc[-1]
        self.last = StreamId(int(last["ms"]), int(last["seq"]))
        return self

    def catch_up(self) -> None:
        """Take in what was logged since: the stream's entries after the last one seen, in order."""
        for row in self.log.stream_rows(self.last):
            user = row[USER_KEY]
            if row[REPLACED_TS_NS] == 0:
                if user in self.newest:
                    self.before[user] = self.newest[user]
                else:
                    self.before.pop(user, None)
            self.newest[user] = row
            self.last = StreamId.parse(row[STREAM_ID])

    def rows(self, users: Iterable[str]) -> dict[str, tuple[dict[str, Any], dict[str, Any] | None]]:
        """Per logged user among `users`: (the newest row, the row before the latest start or None), read with
        each hour file opened once."""
        refs = {
            (u, kind): r
            for u in users
            for kind, table in (("newest", self.newest), ("before", self.before))
            if (r := table.get(u)) is not None
        }
        resolved: dict[tuple[str, str], dict[str, Any]] = {}
        by_file: dict[str, list[tuple[tuple[str, str], int]]] = {}
        for key, r in refs.items():
            if isinstance(r, dict):
                resolved[key] = r
            else:
                by_file.setdefault(r[0], []).append((key, r[1]))
        for file, wanted in by_file.items():
            records = pq.read_table(file).take(pa.array([pos for _, pos in wanted])).to_pylist()
            for (key, _), record in zip(wanted, records, strict=True):
                resolved[key] = _as_row(record)
        return {u: (row, resolved.get((u, "before"))) for (u, kind), row in resolved.items() if kind == "newest"}


def restore_window(logged: Realtime, current: Realtime, now_ms: int, settings: WindowSettings) -> Realtime:
    """The window after a loss: the logged (lost) window merged with the one the store holds now.

    Events are the union, deduplicated by (item_id, event_type, ts_ms), newest first, trimmed as a write trims.
    event_count: the store's events since the loss are new, except those repeating a logged event (a client's
    retry of a write the lost store had taken): logged.count + current.count - shared. Where nothing of the
    logged window would be added (the store already holds it: a rebuild ran before, or the store continues
    the logged row), the store's window stands, with count max(current.count, logged.count).
    Each input's count is taken to cover its own window, so an event only in the part of `current` a window
    has already trimmed away cannot be told from a repeat; the rule then counts it as new."""
    key = lambda e: (e.item_id, e.event_type, e.ts_ms)  # noqa: E731
    held = {key(e) for e in current.events}
    only_logged = [e for e in logged.events if key(e) not in held]
    shared = len(logged) - len(only_logged)
    # merged() takes new events oldest first and keeps what a write would keep at now_ms.
    candidate = current.merged(list(reversed(only_logged)), now_ms, settings)
    kept = set(map(key, only_logged)) & set(map(key, candidate.events))
    if not kept:
        return dataclasses.replace(current, event_count=max(current.event_count, logged.event_count))
    lasts = [t for t in (logged.last_event_ts_ms, current.last_event_ts_ms) if t is not None]
    return dataclasses.replace(
        candidate,
        event_count=logged.event_count + current.event_count - shared,
        last_event_ts_ms=max(lasts, default=None),
    )


def rebuild_realtime(log: EventLog, writer: EventWriter | Callable[[], EventWriter], batch_users: int = 200) -> int:
    """After a total loss of Redis's data: write each logged user's window back through the writer's push path
    (logged too), under the user's lock, merged with what the store holds for the user now (`restore_window`).
    Returns the users whose row was written. A user whose stored row already holds the logged state is left
    alone, so a rerun after a crash mid-rebuild writes only what is missing.

    The lost state of a user the store has no row for is the user's newest logged row. Where the store has one,
    it was written since the loss and started a new lineage; the lost state is the newest row before that start.
    `writer` may be a callable that makes the writer, called only when there is something to write.
    Raises StoreUnavailableError or WriteConflictError like a write does; rerun it then."""
    try:
        lineages = Lineages(log).load()
    except REDIS_ERRORS as exc:
        raise unavailable(log.settings, exc) from None

    def change(current: dict[str, tuple[Realtime, int]], now_ms: int) -> dict[str, Realtime]:
        # Under the batch's locks: what these users logged since the load is final now, so take it in.
        lineages.catch_up()
        logged = lineages.rows(current)
        out = {}
        for user, (stored, stored_ns) in current.items():
            newest, before = logged[user]
            row = before if stored_ns else newest
            if row is None:
                continue
            restored = restore_window(window_of(row), stored, now_ms, settings)
            if not stored_ns or restored != stored:
                out[user] = restored
        return out

    users = sorted(lineages.newest)
    if not users:
        # Nothing logged: nothing to write, and no writer to make. (Making one needs Feast's definitions in the
        # registry, which a brand-new deployment's store gets only from the batch rows' restore after this.)
        return 0
    if callable(writer):  # an EventWriter is not callable; a factory is
        writer = writer()
    settings = writer.settings.window  # read by change(), which runs inside writer.update
    return sum(writer.update(users[lo : lo + batch_users], change) for lo in range(0, len(users), batch_users))
