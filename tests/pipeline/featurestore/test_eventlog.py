"""The event log on a Redis of this module's own (port 6393, append-only, in a tmp dir): the writer logs every
pushed row, the flusher writes each row to the hourly files exactly once (also across a simulated crash), Feast
reads the files, a Redis restart under 20 concurrent HTTP writers loses no accepted event, and a total loss is
rebuilt from the files and the stream. The shared Redis on 6379 is never touched here."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from feast import FeatureStore

from chain.knobs import Knobs
from chain.recommend import Chain
from chain.retrieve import CFStage, ContentStage
from chain.runtimes import LocalStages
from chain.score import BlendStage
from feature_repo import definitions as defs
from models.blender import Blender
from models.bundle import load_core, verified
from models.cf import ALSModel
from models.content import ContentModel
from models.errors import StoreUnavailableError
from models.features import EVENT_TIMESTAMP, USER_KEY
from models.realtime import EventRecord, Realtime, WindowSettings
from pipeline.edge.api import Api, build_api
from pipeline.featurestore.eventlog import (
    EventLog,
    Lineages,
    StreamId,
    lease_key,
    rebuild_realtime,
    restore_window,
    window_of,
)
from pipeline.featurestore.events import EventSettings, EventWriter, validate_events
from pipeline.featurestore.store import (
    OnlineFeatures,
    apply,
    entity_key,
    event_lock_key,
    materialize,
    open_store,
    persistence,
    read_realtime,
    redis_client,
    repo_config,
)
from pipeline.serve.metrics import NullRecorder
from settings import StoreSettings
from tests.conftest import ROOT
from tests.pipeline.conftest import catalog, manifest
from tests.support.keys import keyed
from tests.support.redis_server import OwnRedis, client_for, port_taken

pytestmark = pytest.mark.integration

PORT = 6393  # the drill's own Redis
SPARE_PORT = 6394  # throwaway Redis servers for the persistence report


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory) -> OwnRedis:
    server = OwnRedis(PORT, tmp_path_factory.mktemp("redis-6393"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def settings(own_redis, tmp_path_factory) -> StoreSettings:
    tmp = tmp_path_factory.mktemp("eventlog")
    return StoreSettings(
        redis=f"127.0.0.1:{PORT}",
        project=f"eventlog_{uuid.uuid4().hex[:8]}",
        registry=tmp / "registry.db",
        event_log_dir=tmp / "event_log",
    )


@pytest.fixture(scope="module")
def store(settings, small_bundle) -> FeatureStore:
    s = open_store(settings)
    apply(s, small_bundle, settings.event_log_dir)
    return s


@pytest.fixture(scope="module")
def items(small_bundle) -> list[str]:
    return catalog(small_bundle)


@pytest.fixture
def log(settings, own_redis) -> EventLog:
    """A log over an emptied stream and directory, so each test sees only its own rows."""
    client = own_redis.client()
    client.delete(f"recserve:{settings.project}:event-log", lease_key(settings.project))
    shutil.rmtree(settings.event_log_dir, ignore_errors=True)
    return EventLog(settings)


@pytest.fixture
def writer(store, settings, log) -> EventWriter:
    return EventWriter(store, settings, EventSettings())


def _events(writer: EventWriter, items: list[str], users: list[str], n: int, start: int = 0) -> list[dict]:
    base = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=30)
    return [
        {
            "user_id": users[k % len(users)],
            "item_id": items[k % len(items)],
            "event_type": ("view", "add_to_cart", "purchase")[k % 3],
            "timestamp": (base + dt.timedelta(milliseconds=k)).isoformat(),
        }
        for k in range(start, start + n)
    ]


def _write(writer: EventWriter, items: list[str], raw: list[dict]) -> None:
    writer.write(validate_events(raw, set(items), writer.settings))


def _stored(settings: StoreSettings, users: list[str]) -> dict[str, Realtime]:
    return {u: w for u, (w, _) in read_realtime(redis_client(settings), settings.project, users).items()}


def _iso(ts_ms: int) -> str:
    return dt.datetime.fromtimestamp(ts_ms / 1000, dt.UTC).isoformat(timespec="milliseconds")


def _user(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


# -- what the project's Redis keeps --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (("--appendonly", "no", "--save", ""), "none"),
        (("--appendonly", "no", "--save", "3600 1"), "rdb"),
        (("--appendonly", "yes", "--appendfsync", "always", "--save", ""), "aof(always)"),
        (("--save", "", "--rename-command", "CONFIG", ""), "unknown"),
    ],
)
def test_persistence_says_how_redis_keeps_its_data(tmp_path, extra, expected):
    server = OwnRedis(SPARE_PORT, tmp_path, extra)
    server.start()
    try:
        assert persistence(server.client()) == expected
    finally:
        server.stop()


def test_the_drill_redis_runs_append_only_everysec(own_redis):
    assert persistence(own_redis.client()) == "aof(everysec)"


def test_ensure_redis_starts_an_append_only_redis_in_the_given_dir(tmp_path):
    if port_taken(SPARE_PORT):
        pytest.fail(f"port {SPARE_PORT} is taken: this test starts a Redis of its own there; free the port")
    script = ROOT / "deploy" / "ensure-redis.sh"
    env = {"PATH": os.environ["PATH"], "REDIS_PORT": str(SPARE_PORT), "RECSERVE_REDIS_DIR": str(tmp_path)}
    out = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=30)
    client = client_for(SPARE_PORT)
    try:
        assert out.returncode == 0, out.stderr
        assert persistence(client) == "aof(everysec)"
        assert client.config_get("dir")["dir"] == str(tmp_path) and client.config_get("save")["save"] == ""
    finally:
        pid = int(client.info("server")["process_id"])  # the daemon this test started
        client.shutdown()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert (tmp_path / "appendonlydir").is_dir()


# -- the writer's log and the flusher -----------------------------------------------------------------------


def test_every_pushed_row_is_logged_and_flushed_to_its_hour_file_exactly_once(writer, log, settings, items):
    users = [_user("log") for _ in range(3)]
    _write(writer, items, _events(writer, items, users, 6))
    assert log.backlog() == 3  # one row per user of the batch, not one per event
    _write(writer, items, _events(writer, items, users[:1], 2, start=6))
    assert log.backlog() == 4

    assert log.flush_once() == 4
    assert log.backlog() == 0 and log.flush_once() == 0  # drained, and a rerun writes nothing
    files = log.hour_files()
    assert files and all(f.name.startswith("user_events-") for f in files)
    flushed = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)  # complete, readable files
    assert len(flushed) == 4 and flushed["stream_id"].is_unique
    assert set(flushed.columns) >= {USER_KEY, EVENT_TIMESTAMP, "rt_event_item_ids", "rt_event_count", "stream_id"}
    hours = {f"user_events-{ts:%Y%m%d%H}.parquet" for ts in flushed[EVENT_TIMESTAMP]}
    assert hours == {f.name for f in files}
    # The newest logged row of each user is what the store holds.
    newest = flushed.sort_values("stream_id", key=lambda s: s.map(StreamId.parse)).groupby(USER_KEY).tail(1)
    stored = _stored(settings, users)
    for row in pa.Table.from_pandas(newest).to_pylist():
        assert window_of(row) == stored[row[USER_KEY]]
    assert stored[users[0]].event_count == 4


def _crafted(user: str, when: dt.datetime, item: str) -> dict:
    window = Realtime.of([EventRecord(item, "view", int(when.timestamp() * 1000))], 1, int(when.timestamp() * 1000))
    return {USER_KEY: user, EVENT_TIMESTAMP: when, **window.columns(), "replaced_ts_ns": 0}


def test_a_crash_between_the_file_rename_and_the_trim_writes_nothing_twice(log, items):
    # Three rows over two hours; a crash after the first hour's file was renamed, before the second's and before
    # the trim: the rerun must write only the second hour's row.
    h = dt.datetime(2026, 11, 29, 13, 59, 59, tzinfo=dt.UTC)
    rows = [_crafted("crash-a", h, items[0]), _crafted("crash-b", h + dt.timedelta(seconds=2), items[1])]
    rows.append(_crafted("crash-c", h, items[2]))
    log.append(rows)
    entries = log.stream_rows()
    first_hour = [r for r in entries if r[USER_KEY] != "crash-b"]
    assert log.write_files(first_hour) == 2  # the file step alone: no trim

    assert log.flush_once() == 1  # only crash-b's row was missing
    assert log.backlog() == 0 and log.flush_once() == 0
    names = [f.name for f in log.hour_files()]
    assert names == ["user_events-2026112913.parquet", "user_events-2026112914.parquet"]
    flushed = log.read_files()
    assert sorted(flushed[USER_KEY]) == ["crash-a", "crash-b", "crash-c"] and flushed["stream_id"].is_unique
    assert log.write_files(entries) == 0  # the whole prefix again: everything is there already


def test_an_entry_whose_writer_still_holds_the_user_lock_waits_for_the_next_flush(log, settings, items):
    client = redis_client(settings)
    when = dt.datetime.now(dt.UTC)
    lock = event_lock_key(settings.project, "busy-user")
    client.set(lock, "a-writer", px=10_000)
    try:
        log.append([_crafted("busy-user", when, items[0]), _crafted("free-user", when, items[1])])
        assert log.flush_once() == 0 and log.backlog() == 2  # a prefix only: nothing passes the busy entry
    finally:
        client.delete(lock)
    assert log.flush_once() == 2 and log.backlog() == 0


def test_a_failed_push_takes_its_log_entries_back_and_is_retryable(store, settings, log, items):
    # Feast's own Redis client points at a dead port; the locks, the read and the log use the live Redis.
    dead = settings.model_copy(update={"redis": "127.0.0.1:1"})
    broken = EventWriter(FeatureStore(repo_path=str(defs.REPO), config=repo_config(dead)), settings, EventSettings())
    user = _user("unpushed")
    with pytest.raises(StoreUnavailableError, match="retry") as info:
        _write(broken, items, _events(broken, items, [user], 2))
    assert info.value.retryable
    assert log.backlog() == 0  # nothing logged that is not stored
    assert _stored(settings, [user])[user].event_count == 0


def test_one_flusher_holds_the_lease_at_a_time(settings, log):
    other = EventLog(settings)
    assert log.holds_lease() and log.holds_lease()  # taken, then renewed
    assert not other.holds_lease() and other.flush_once() == 0
    log.release()
    assert other.holds_lease() and not log.holds_lease()
    other.release()


def test_the_background_flusher_drains_the_stream_and_stops_cleanly(writer, log, settings, items):
    users = [_user("bg") for _ in range(2)]

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(log.run_flusher(stop, interval_s=0.05))
        await asyncio.to_thread(_write, writer, items, _events(writer, items, users, 4))
        deadline = time.monotonic() + 10
        while log.backlog() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.wait_for(task, 10)

    asyncio.run(scenario())
    assert log.backlog() == 0 and len(log.read_files()) == 2
    assert not redis_client(settings).exists(lease_key(settings.project))  # released on stop


def test_feast_and_pandas_read_the_flushed_rows(writer, log, store, settings, items):
    users = [_user("feast") for _ in range(3)]
    _write(writer, items, _events(writer, items, users, 9))
    assert log.flush_once() == 3
    # A temp file left by a crash mid-write must not break either reader.
    (settings.event_log_dir / ".user_events-2026112913.parquet.tmp").write_bytes(b"torn")
    assert len(pd.read_parquet(settings.event_log_dir)) == 3
    entity_df = pd.DataFrame({USER_KEY: users, EVENT_TIMESTAMP: [pd.Timestamp.now(tz="UTC")] * 3})
    got = store.get_historical_features(
        entity_df=entity_df,
        features=[f"{defs.USER_REALTIME}:rt_event_count", f"{defs.USER_REALTIME}:rt_event_item_ids"],
    ).to_df()
    stored = _stored(settings, users)
    for row in got.to_dict("records"):
        assert row["rt_event_count"] == stored[row[USER_KEY]].event_count == 3
        assert list(row["rt_event_item_ids"]) == list(stored[row[USER_KEY]].item_ids)
    assert pq.read_schema(settings.event_log_dir / "user_events-schema.parquet").names == list(log.read_files().columns)


# -- the merge rule of a rebuild (no Redis) -----------------------------------------------------------------

W = WindowSettings()
NOW = 1_780_000_000_000


def _window(events: list[tuple[str, int]], count: int) -> Realtime:
    records = sorted((EventRecord(i, "view", NOW - age) for i, age in events), key=lambda e: -e.ts_ms)
    return Realtime.of(records, count, records[0].ts_ms if records else None)


def test_restore_adds_the_events_written_since_the_loss_to_the_lost_window():
    lost = _window([("a", 5000), ("b", 4000)], count=10)  # 8 older events were trimmed long ago
    since = _window([("c", 100)], count=1)
    got = restore_window(lost, since, NOW, W)
    assert [e.item_id for e in got.events] == ["c", "b", "a"]
    assert got.event_count == 11 and got.last_event_ts_ms == NOW - 100


def test_restore_counts_a_retried_event_once():
    lost = _window([("a", 5000), ("b", 4000)], count=10)
    since = _window([("b", 4000), ("c", 100)], count=2)  # b: a client's retry of a write the lost store took
    got = restore_window(lost, since, NOW, W)
    assert [e.item_id for e in got.events] == ["c", "b", "a"] and got.event_count == 11


def test_restore_leaves_a_window_that_already_holds_the_lost_one():
    lost = _window([("a", 5000), ("b", 4000)], count=10)
    after = restore_window(lost, _window([("c", 100)], count=1), NOW, W)
    assert restore_window(lost, after, NOW + 1, W) == after  # a rerun changes nothing
    continued = _window([("a", 5000), ("b", 4000), ("c", 100)], count=11)  # the store never lost it
    assert restore_window(lost, continued, NOW, W) == continued


# -- the restart drill --------------------------------------------------------------------------------------


@dataclass
class Sent:
    events: list[tuple[str, str, int]]  # (user, item, ts_ms)
    status: int
    retry_after: str | None
    sent: float  # seconds since the drill began
    answered: float


def _resumed(sent: list[Sent], up: float) -> set[str]:
    """The users with a write sent after Redis answered again and accepted."""
    return {s.events[0][0] for s in list(sent) if s.sent > up and s.status == 202}


def _resumed_at(sent: list[Sent], up: float) -> float:
    firsts: dict[str, float] = {}
    for s in sorted((s for s in sent if s.sent > up and s.status == 202), key=lambda s: s.answered):
        firsts.setdefault(s.events[0][0], s.answered)
    return max(firsts.values())


class BackgroundFlusher:
    """`run_flusher` on an event loop in a thread of its own, as an ingress replica runs it."""

    def __init__(self, log: EventLog, interval_s: float) -> None:
        self.loop = asyncio.new_event_loop()
        self.stop_event = asyncio.Event()
        self.thread = threading.Thread(
            target=self.loop.run_until_complete, args=(log.run_flusher(self.stop_event, interval_s),)
        )

    def __enter__(self) -> BackgroundFlusher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(30)
        self.loop.close()


def test_a_redis_restart_under_twenty_concurrent_writers_loses_no_accepted_event(
    own_redis, store, settings, small_bundle, items, log
):
    materialize(store, settings, small_bundle, manifest(small_bundle))
    core = load_core(small_bundle)
    path, _, train = verified(small_bundle)
    stages = LocalStages(
        CFStage(ALSModel.load(path, train.cf)), ContentStage(ContentModel.load(path)), BlendStage(Blender.load(path))
    )
    online = OnlineFeatures.load(settings, core.version, core.snapshot.item_ids.tolist())
    service = Chain(core, online, stages, Knobs(max_in_flight=100), NullRecorder())
    events = EventSettings()
    api = Api(service, settings, events, lambda: EventWriter(store, settings, events))
    keys, auth = keyed()
    app = build_api(lambda: api, keys=keys)

    users = [_user("drill") for _ in range(8)]
    base_ms = int(time.time() * 1000) - 3_600_000
    serial = itertools.count()
    sent: list[Sent] = []
    stop = threading.Event()
    started = time.monotonic()

    async def client_loop() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://drill", headers=auth) as http:
            while not stop.is_set():
                n = next(serial)
                user, size = users[n % len(users)], 1 + n % 2
                batch = [(user, items[(n + k) % len(items)], base_ms + 2 * n + k) for k in range(size)]
                body = [{"user_id": u, "item_id": i, "event_type": "view", "timestamp": _iso(ts)} for u, i, ts in batch]
                at = time.monotonic() - started
                r = await http.post("/events", json={"events": body})
                sent.append(Sent(batch, r.status_code, r.headers.get("retry-after"), at, time.monotonic() - started))
                if r.status_code != 202:
                    await asyncio.sleep(0.02)

    threads = [threading.Thread(target=asyncio.run, args=(client_loop(),)) for _ in range(20)]
    with BackgroundFlusher(log, interval_s=0.2):
        for t in threads:
            t.start()
        time.sleep(1.5)
        stopping = time.monotonic() - started
        own_redis.shutdown()
        down = time.monotonic() - started  # the process has exited
        time.sleep(1.0)
        restarting = time.monotonic() - started
        own_redis.start()
        up = time.monotonic() - started  # answering again
        # Writes cut off mid-way left their user locks in the AOF; those users wait out the lock TTL (5 s) and
        # answer 503 meanwhile. Keep writing until every user has had a write accepted again (at most 12 s).
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline and (time.monotonic() - started < up + 1 or _resumed(sent, up) != set(users)):
            time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads)

    accepted = [s for s in sent if s.status == 202]
    refused = [s for s in sent if s.status != 202]
    assert all(s.status == 503 and s.retry_after == "1" for s in refused), Counter(s.status for s in refused)
    during = [s for s in sent if down < s.sent and s.answered < restarting]  # Redis was gone all along
    assert during and all(s.status == 503 for s in during)
    assert _resumed(sent, up) == set(users)  # every user's writes resume once Redis is back

    windows = _stored(settings, users)
    held = Counter((u, e.item_id, e.ts_ms) for u, w in windows.items() for e in w.events)
    ok = [e for s in accepted for e in s.events]
    assert all(held[e] == 1 for e in ok)  # every accepted event is there, once
    assert max(held.values()) == 1
    ambiguous = sum(held[e] for s in refused for e in s.events)  # refused, yet stored before the cut
    assert sum(w.event_count for w in windows.values()) == len(ok) + ambiguous  # nothing counted twice

    # The log holds what the store holds: every user's newest logged row is its stored window.
    while log.flush_once():
        pass
    lineages = Lineages(log).load()
    logged = lineages.rows(users)
    assert {u: window_of(logged[u][0]) for u in users} == windows
    print(
        f"\ndrill: {len(sent)} POST /events in {max(s.answered for s in sent):.1f} s from 20 writers; "
        f"{len(accepted)} accepted ({len(ok)} events), {len(refused)} answered 503 + Retry-After "
        f"({ambiguous} of their events had been stored before the cut); "
        f"Redis stopping at {stopping:.2f} s, gone {down:.2f}-{restarting:.2f} s, answering again at {up:.2f} s; "
        f"{len(during)} POSTs sent and answered while it was gone; {len(log.read_files())} rows in the log files; "
        f"{sum(s.sent > up for s in accepted)} accepted since, all users resumed by {_resumed_at(sent, up):.2f} s"
    )


# -- a total loss ------------------------------------------------------------------------------------------


def test_after_a_total_loss_the_rebuild_restores_every_window_and_keeps_what_came_since(
    own_redis, writer, log, settings, items
):
    users = [_user("lost") for _ in range(4)]
    _write(writer, items, _events(writer, items, users, 40))
    _write(writer, items, _events(writer, items, users[:2], 6, start=40))
    before = _stored(settings, users)
    while log.flush_once():
        pass

    own_redis.client().flushall()  # every key gone: rows, the stream, the locks, the lease
    assert _stored(settings, users)[users[0]].event_count == 0
    since, fresh = users[0], _user("fresh")
    _write(writer, items, _events(writer, items, [since], 3, start=100))  # accepted after the loss
    _write(writer, items, _events(writer, items, [fresh], 2, start=200))
    log.flush_once()  # some of what came since is in the files too
    _write(writer, items, _events(writer, items, [since], 1, start=300))  # ... and some only in the stream
    after_loss = _stored(settings, [since, fresh])

    t0 = time.perf_counter()
    assert rebuild_realtime(log, writer) == len(users)  # the fresh user lost nothing and is left alone
    took = time.perf_counter() - t0
    now = _stored(settings, [*users, fresh])
    for u in users[1:]:
        assert now[u].events == before[u].events and now[u].event_count == before[u].event_count
        assert now[u].last_event_ts_ms == before[u].last_event_ts_ms
    keys = lambda w: {(e.item_id, e.event_type, e.ts_ms) for e in w.events}  # noqa: E731
    assert keys(now[since]) == keys(before[since]) | keys(after_loss[since])
    assert now[since].event_count == before[since].event_count + 4
    assert now[fresh] == after_loss[fresh]

    assert rebuild_realtime(log, writer) == 0  # a rerun (say after a crash mid-rebuild) writes nothing
    _write(writer, items, _events(writer, items, [users[1]], 1, start=400))
    assert _stored(settings, [users[1]])[users[1]].event_count == before[users[1]].event_count + 1
    print(f"\nrebuild: {len(users)} users restored from {len(log.read_files())} logged rows in {took * 1000:.0f} ms")


def test_the_rebuild_takes_rows_still_in_the_stream(writer, log, settings, items):
    user = _user("streamed")
    _write(writer, items, _events(writer, items, [user], 5))
    before = _stored(settings, [user])[user]
    assert log.backlog() == 1 and not log.hour_files()
    redis_client(settings).delete(entity_key(settings.project, **{USER_KEY: user}))  # the row alone is lost
    assert rebuild_realtime(log, writer) == 1
    got = _stored(settings, [user])[user]
    assert got.events == before.events and got.event_count == 5
