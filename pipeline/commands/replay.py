"""`recserve replay`: logged requests through the same chain, offline, against one bundle.

Each input line is a /recommend body plus optional session events:
    {"user_id": "12347", "k": 10, "exclude": ["85123A"], "query": "mug", "events": [{"item_id": "22423",
     "event_type": "view", "timestamp": "2011-12-01T10:00:00Z"}]}
Each output line is what the live service answers for it (the /recommend body without request_id and timings),
provided the store holds the bundle's rows and, for the user, exactly those events.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from chain.context import BundleFeatures
from chain.offline import OfflineChain, open_offline
from chain.types import Query, Recommendation
from models.errors import ConfigError, RecserveError
from models.realtime import EventRecord, Realtime
from pipeline.edge.schemas import RecommendRequest
from pipeline.featurestore.events import EventSettings, validate_events


class ReplayRequest(RecommendRequest):
    events: list[dict[str, Any]] = Field(
        default_factory=list, description="the user's session events, as POST /events takes them (no user_id)"
    )


def read_requests(path: Path) -> Iterator[tuple[int, ReplayRequest]]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"--requests {path}: cannot read it ({exc}): pass a JSON-lines file") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield n, ReplayRequest.model_validate_json(line)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "line"
            raise ConfigError(f"{path}:{n}: field {field!r}: {first['msg']}: fix that line") from None


def window(req: ReplayRequest, known_items: frozenset[str], settings: EventSettings, where: str) -> Realtime:
    """The event window the writer would have stored for these events (Realtime.merged, as POST /events does)."""
    if not req.events:
        return Realtime.empty()
    now = dt.datetime.now(dt.UTC)
    try:
        events = validate_events([{**e, "user_id": req.user_id} for e in req.events], known_items, settings, now)
    except RecserveError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    records = [EventRecord(e.item_id, e.event_type, int(e.timestamp.timestamp() * 1000)) for e in events]
    return Realtime.empty().merged(records, int(now.timestamp() * 1000), settings.window)


def answer(r: Recommendation) -> dict[str, Any]:
    return {
        "user_id": r.user_id,
        "model_version": r.model_version,
        "items": [
            {
                "item_id": i.item_id,
                "description": i.description,
                "score": i.score,
                "sources": list(i.sources),
                "reason": i.reason,
            }
            for i in r.items
        ],
        "degraded": r.degraded,
        "fallback_reason": r.fallback_reason,
    }


def replay(
    requests: Path,
    bundle: Path,
    out: Path,
    settings: EventSettings | None = None,
    compile_cache: Path | None = None,
) -> int:
    """Answers every request of `requests` into `out` (JSON lines, same order); returns how many. `compile_cache`:
    where the blender's compiled trees are kept (default: the temp dir)."""
    settings = settings or EventSettings()
    chain: OfflineChain = open_offline(bundle, compile_cache=compile_cache)
    known = frozenset(chain.snapshot.item_ids.tolist())
    windows: dict[str, Realtime] = {}
    chain.store = BundleFeatures(chain.snapshot, windows)
    n = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as fh:
        for line, req in read_requests(requests):
            windows.clear()
            windows[req.user_id] = window(req, known, settings, f"{requests}:{line}")
            q = Query(req.user_id, req.k, tuple(req.exclude), req.query)
            fh.write(json.dumps(answer(chain.recommend(q))) + "\n")
            n += 1
    return n
