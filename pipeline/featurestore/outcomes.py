"""Online outcomes of a rollout: which arm's answers led to an add-to-cart or a purchase, kept in Redis.

An answer of /recommend is an *exposure*: one user, one arm (and its bundle version), the items shown, a time. An
add_to_cart or purchase event, newly stored by the event writer, for an item that the same user was shown within
the attribution window (`OutcomeSettings.window_s`, 30 minutes by default) *converts* the answer that showed it,
for the arm that answered. One answer converts at most once, so per arm

    hit rate = converted answers / answers

is a proportion of independent-ish Bernoulli trials (one per answer), the quantity `recserve rollout status`
puts a Wilson interval on (models/hitrate.py). (Answers of one user are not independent; the harness sends one
answer per user, where they are.)

Everything lives in Redis, under the Feast project (so tests, drills and the demo never meet) and the rollout's
salt (a new experiment starts from zero), so every replica shares it and a restart keeps it:

    recserve:<project>:outcomes:<len(salt)>:<salt>:exposed:<len(user)>:<user>   hash item -> answer|arm|version|ms
    recserve:<project>:outcomes:<len(salt)>:<salt>:converted:<answer id>       string, SET NX (once per answer)
    recserve:<project>:outcomes:<len(salt)>:<salt>:counts                      hash answers|arm|version -> n,
                                                                                    converted|arm|version -> n

The exposure hash and the per-answer keys expire after the window (the hash's TTL is renewed by each exposure; a
field older than the window is ignored when read). The counts live as long as the project: `clear` drops a salt's
keys, `store.drop_project` a project's.

`exposed` never touches Redis: it appends to a bounded in-memory buffer, which `run_flusher` writes in one
pipeline every `flush_s` (0.15 s) from a background task. So /recommend never waits on Redis for this; when Redis
is down the buffer keeps the newest `max_buffer` exposures and counts the ones it drops (`exposures_dropped`).
A purchase within `flush_s` of its answer can miss its exposure; people take longer than that to buy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis
from pydantic import BaseModel, ConfigDict, Field

from models.realtime import EventRecord
from pipeline.featurestore.client import REDIS_ERRORS

log = logging.getLogger("recserve")

CONVERTING_EVENTS = frozenset({"add_to_cart", "purchase"})
SEP = "\x1f"  # between the fields of a stored exposure and of a count's name; never in an arm name or version

# Atomic "this answer converts once": the per-answer marker and the arm's count move together, so a crash between
# the two can neither count an answer twice nor leave a marker without its count.
_CONVERT = """
if redis.call('set', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  redis.call('hincrby', KEYS[2], ARGV[2], 1)
  return 1
end
return 0
"""


class OutcomeSettings(BaseModel):
    """The serve config's `args.outcomes`: how conversions are attributed to a rollout's arms."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    window_s: int = Field(
        1800,
        ge=1,
        le=7 * 86_400,
        description="an add_to_cart or purchase converts an answer that showed the item at most this long before",
    )
    flush_s: float = Field(
        0.15, gt=0, le=10, description="exposures are written to Redis in one pipeline this often (off the request)"
    )
    max_buffer: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description="exposures held in memory while Redis does not answer; past it the oldest are dropped (counted)",
    )


class OutcomeRecorder(Protocol):
    """The metrics Outcomes reports (pipeline/serve/metrics.py implements it)."""

    def conversion(self, arm: str, version: str) -> None: ...
    def outcome(self, outcome: str, n: int) -> None: ...


class _Silent:
    def conversion(self, arm: str, version: str) -> None:
        pass

    def outcome(self, outcome: str, n: int) -> None:
        pass


@dataclass(frozen=True)
class Exposure:
    """One answer as shown: `ts_ms` is wall-clock ms since the epoch, when the answer was made."""

    salt: str
    user_id: str
    arm: str
    version: str
    answer_id: str
    items: tuple[str, ...]
    ts_ms: int


@dataclass(frozen=True)
class Conversion:
    """A newly converted answer: the event (user, item, type, ms) that converted it and the answer's arm."""

    user_id: str
    item_id: str
    event_type: str
    answer_id: str
    arm: str
    version: str


@dataclass(frozen=True)
class ArmCounts:
    """One arm's (and bundle version's) totals in one experiment, cluster-wide since it started."""

    arm: str
    version: str
    answers: int
    converted: int


def _prefix(project: str, salt: str) -> str:
    # Lengths first: a salt or user id may hold ':', and no two (salt, user) pairs may read as the same key.
    return f"recserve:{project}:outcomes:{len(salt)}:{salt}"


def exposed_key(project: str, salt: str, user_id: str) -> str:
    return f"{_prefix(project, salt)}:exposed:{len(user_id)}:{user_id}"


def converted_key(project: str, salt: str, answer_id: str) -> str:
    return f"{_prefix(project, salt)}:converted:{answer_id}"


def counts_key(project: str, salt: str) -> str:
    return f"{_prefix(project, salt)}:counts"


class Outcomes:
    """Exposures and conversions of one Feast project's rollouts, over one Redis client (see the module).

    Thread-safe: `exposed` runs on the event loop, `flush` on a worker thread, `attribute` wherever /events runs."""

    def __init__(
        self,
        client: redis.Redis,
        project: str,
        settings: OutcomeSettings | None = None,
        recorder: OutcomeRecorder | None = None,
    ) -> None:
        self.client = client
        self.project = project
        self.settings = settings or OutcomeSettings()
        self.recorder: OutcomeRecorder = recorder or _Silent()
        self._buffer: deque[Exposure] = deque()
        self._lock = threading.Lock()
        self._convert = client.register_script(_CONVERT)
        self.dropped = 0  # exposures dropped from a full buffer since this object was made

    # -- exposures: the /recommend side -------------------------------------------------------------------------

    def exposed(
        self,
        salt: str,
        user_id: str,
        arm: str,
        version: str,
        item_ids: Sequence[str],
        answer_id: str | None = None,
        now_ms: int | None = None,
    ) -> str:
        """Buffer one answer as an exposure (no I/O, a few µs); returns its answer id (a fresh uuid4 hex unless
        given). `now_ms`: wall-clock ms since the epoch, default now. The oldest buffered exposure is dropped
        (and counted) when the buffer is full."""
        answer_id = answer_id or uuid.uuid4().hex
        ts = int(time.time() * 1000) if now_ms is None else now_ms
        exposure = Exposure(salt, user_id, arm, version, answer_id, tuple(item_ids), ts)
        with self._lock:
            dropped = self._add([exposure])
        if dropped:
            self.recorder.outcome("exposures_dropped", dropped)
        return answer_id

    def _add(self, exposures: Iterable[Exposure], front: bool = False) -> int:
        # Under the lock. Newest kept: an old exposure is the likeliest to have passed its window anyway.
        if front:
            self._buffer.extendleft(reversed(list(exposures)))
        else:
            self._buffer.extend(exposures)
        dropped = max(0, len(self._buffer) - self.settings.max_buffer)
        for _ in range(dropped):
            self._buffer.popleft()
        self.dropped += dropped
        return dropped

    @property
    def pending(self) -> int:
        """Exposures buffered, not yet in Redis."""
        return len(self._buffer)

    def flush(self) -> int:
        """Write every buffered exposure in one pipeline (the user's hash, its TTL, the arm's answer count);
        returns how many. Never raises for Redis: on failure the batch goes back to the buffer's front (the
        oldest beyond `max_buffer` dropped and counted) and 0 is returned. Blocking: call it off the event loop."""
        with self._lock:
            batch, self._buffer = self._buffer, deque()
        if not batch:
            return 0
        window = self.settings.window_s
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for e in batch:
                    key = exposed_key(self.project, e.salt, e.user_id)
                    value = SEP.join((e.answer_id, e.arm, e.version, str(e.ts_ms)))
                    if e.items:
                        pipe.hset(key, mapping=dict.fromkeys(e.items, value))
                        pipe.expire(key, window)
                    pipe.hincrby(counts_key(self.project, e.salt), SEP.join(("answers", e.arm, e.version)), 1)
                pipe.execute()
        except REDIS_ERRORS as exc:
            with self._lock:
                dropped = self._add(batch, front=True)
            self.recorder.outcome("flush_failed", len(batch))
            if dropped:
                self.recorder.outcome("exposures_dropped", dropped)
            log.warning("outcomes: %d exposures not written (%s); kept %d to retry", len(batch), exc, self.pending)
            return 0
        self.recorder.outcome("exposures_flushed", len(batch))
        return len(batch)

    async def run_flusher(self, stop: asyncio.Event) -> None:
        """Flush every `flush_s` until `stop` is set, then once more. The Redis work runs on a worker thread."""
        while True:
            await asyncio.to_thread(self.flush)
            if stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.flush_s)

    # -- conversions: the /events side --------------------------------------------------------------------------

    def attribute(self, salt: str, stored: Mapping[str, Sequence[EventRecord]]) -> list[Conversion]:
        """Count the conversions that newly stored events make: for each add_to_cart or purchase, the exposure of
        its item to the same user under `salt` at most `window_s` before the event (and not after it) converts
        that answer, for the arm that answered, unless the answer converted already. `stored` is each user's
        events as the writer stored them (repeats of a stored event_id left out, so a retry never counts twice).

        Two round trips (one read, one conversion pipeline). Returns the answers converted by this call. Raises
        redis's ConnectionError or TimeoutError when Redis fails: the caller counts and logs it; the events are
        stored whatever happens here."""
        wanted = {u: [e for e in events if e.event_type in CONVERTING_EVENTS] for u, events in stored.items() if events}
        wanted = {u: events for u, events in wanted.items() if events}
        if not wanted:
            return []
        users = list(wanted)
        with self.client.pipeline(transaction=False) as pipe:
            for u in users:
                pipe.hmget(exposed_key(self.project, salt, u), list(dict.fromkeys(e.item_id for e in wanted[u])))
            replies = pipe.execute()
        window_ms = self.settings.window_s * 1000
        found: dict[str, Conversion] = {}  # answer id -> the first event that converts it in this call
        for u, reply in zip(users, replies, strict=True):
            items = list(dict.fromkeys(e.item_id for e in wanted[u]))
            shown = {item: raw.decode() for item, raw in zip(items, reply, strict=True) if raw is not None}
            for event in sorted(wanted[u], key=lambda e: e.ts_ms):
                if event.item_id not in shown:
                    continue
                answer_id, arm, version, ts = shown[event.item_id].split(SEP)
                if 0 <= event.ts_ms - int(ts) <= window_ms and answer_id not in found:
                    found[answer_id] = Conversion(u, event.item_id, event.event_type, answer_id, arm, version)
        if not found:
            return []
        counts = counts_key(self.project, salt)
        with self.client.pipeline(transaction=False) as pipe:
            for c in found.values():
                self._convert(
                    keys=[converted_key(self.project, salt, c.answer_id), counts],
                    args=[self.settings.window_s, SEP.join(("converted", c.arm, c.version))],
                    client=pipe,
                )
            fresh = pipe.execute()
        out = [c for c, new in zip(found.values(), fresh, strict=True) if new]
        for c in out:
            self.recorder.conversion(c.arm, c.version)
        return out

    # -- reading and clearing -----------------------------------------------------------------------------------

    def counts(self, salt: str) -> list[ArmCounts]:
        """Every arm's (and version's) answers and converted answers under `salt`, cluster-wide; sorted by arm,
        then version. Raises redis's ConnectionError or TimeoutError."""
        return read_counts(self.client, self.project, salt)

    def clear(self, salt: str) -> int:
        """Delete every key of one experiment (exposures, markers, counts); returns how many. For harnesses and
        tests: a live experiment gets a new salt instead."""
        keys = list(self.client.scan_iter(match=f"{_prefix(self.project, salt)}:*", count=1000))
        for lo in range(0, len(keys), 1000):
            self.client.delete(*keys[lo : lo + 1000])
        return len(keys)


def read_counts(client: redis.Redis, project: str, salt: str) -> list[ArmCounts]:
    """Every arm's (and version's) answers and converted answers under `salt`, from the counts hash. Raises
    redis's ConnectionError or TimeoutError."""
    raw: dict[Any, Any] = client.hgetall(counts_key(project, salt))
    table: dict[tuple[str, str], dict[str, int]] = {}
    for name, value in raw.items():
        kind, arm, version = (name.decode() if isinstance(name, bytes) else name).split(SEP)
        table.setdefault((arm, version), {})[kind] = int(value)
    return [
        ArmCounts(arm, version, row.get("answers", 0), row.get("converted", 0))
        for (arm, version), row in sorted(table.items())
    ]
