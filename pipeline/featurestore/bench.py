"""`recserve features bench`: the feature store's two bars, measured against the real Redis.

It works in a scratch Feast project (<project>_bench) with a registry of its own, so the demo's rows and events
are never touched, and it drops that project when done.
"""

from __future__ import annotations

import datetime as dt
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.bundle import Manifest
from models.features import USER_KEY
from models.realtime import EVENT_TYPES
from pipeline.featurestore.events import EventSettings, EventWriter, validate_events
from pipeline.featurestore.store import (
    OnlineFeatures,
    drop_project,
    materialize,
    open_store,
    read_user_via_feast,
)
from settings import StoreSettings


def _pcts(seconds: list[float]) -> str:
    ms = np.asarray(seconds) * 1000
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return f"n={ms.size} p50={p50:.2f} p95={p95:.2f} p99={p99:.2f} max={ms.max():.2f} ms"


def run(bundle_dir: Path, manifest: Manifest, base: StoreSettings, reads: int, events: int, seed: int) -> str:
    """Time `reads` hydration reads and `events` event writes in a scratch project (<base project>_bench) on
    `base`'s Redis, dropped afterwards; the report's lines, latencies in ms."""
    rng = np.random.default_rng(seed)
    version = manifest.version
    with tempfile.TemporaryDirectory() as tmp:
        settings = StoreSettings(
            redis=base.redis,
            project=f"{base.project}_bench",
            registry=Path(tmp) / "registry.db",
            event_log_dir=Path(tmp) / "event_log",
        )
        store = open_store(settings)
        try:
            return _measure(store, settings, bundle_dir, manifest, version, rng, reads, events)
        finally:
            drop_project(store, settings)


def _measure(
    store: Any,
    settings: StoreSettings,
    bundle_dir: Path,
    manifest: dict[str, Any],
    version: str,
    rng: np.random.Generator,
    reads: int,
    events: int,
) -> str:
    started = time.perf_counter()
    materialize(store, settings, bundle_dir, manifest)
    mat_s = time.perf_counter() - started
    item_ids = pd.read_parquet(bundle_dir / "catalog.parquet")["item_id"].tolist()
    users = pd.read_parquet(bundle_dir / "user_features.parquet", columns=[USER_KEY])[USER_KEY].tolist()
    online = OnlineFeatures.load(settings, version, item_ids)
    writer = EventWriter(store, settings, EventSettings())
    known = frozenset(item_ids)

    # Event to visible: the time from the write call's start until a read shows the event.
    active = [str(u) for u in rng.choice(users, size=min(300, len(users)), replace=False)]
    visible = []
    for _ in range(events):
        user = active[int(rng.integers(len(active)))]
        raw = [{"user_id": user, "item_id": item_ids[int(rng.integers(len(item_ids)))], "event_type": "view"}]
        raw[0]["event_type"] = EVENT_TYPES[int(rng.integers(len(EVENT_TYPES)))]
        before = online.user(user).realtime.event_count
        t0 = time.perf_counter()
        writer.write(validate_events(raw, known, writer.settings))
        while online.user(user).realtime.event_count == before:
            if time.perf_counter() - t0 > 5:
                raise RuntimeError(f"event for {user} not visible after 5 s")
        visible.append(time.perf_counter() - t0)

    # Hydration: known users (a third of them with events from above) and 10% users the bundle never saw.
    sample = [str(u) for u in rng.choice(users, size=reads)]
    sample = [u if rng.random() > 0.1 else f"new-{i}" for i, u in enumerate(sample)]
    for u in sample[:50]:
        online.user(u)  # warm the connection
    user_reads = []
    for u in sample:
        t0 = time.perf_counter()
        online.user(u)
        user_reads.append(time.perf_counter() - t0)
    candidates = [rng.choice(len(item_ids), size=min(200, len(item_ids)), replace=False) for _ in range(200)]
    full_reads = []
    for u, items in zip(sample, candidates, strict=False):
        t0 = time.perf_counter()
        online.read(u, items)
        full_reads.append(time.perf_counter() - t0)
    # The worst case the window allows: a user with max_events events in the last day.
    heavy = "bench-heavy-user"
    cap = writer.settings.max_events
    for lo in range(0, cap, writer.settings.max_batch):
        raw = [
            {"user_id": heavy, "item_id": item_ids[(lo + j) % len(item_ids)], "event_type": "view"}
            for j in range(min(writer.settings.max_batch, cap - lo))
        ]
        writer.write(validate_events(raw, known, writer.settings))
    heavy_reads = []
    for _ in range(2000):
        t0 = time.perf_counter()
        online.user(heavy)
        heavy_reads.append(time.perf_counter() - t0)
    feast_reads = []
    for u in sample[:300]:
        t0 = time.perf_counter()
        read_user_via_feast(store, version, u)
        feast_reads.append(time.perf_counter() - t0)
    events_held = np.mean([online.user(u).realtime.event_count for u in active])
    return "\n".join(
        [
            f"feature store bench, bundle {version}, Redis {settings.redis}, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M}",
            f"materialize: {mat_s:.2f} s",
            f"event write to visible ({events} single-event writes, {len(active)} users): {_pcts(visible)}",
            f"hydrate one user, batch + real-time (raw read; {events_held:.1f} events per active user): "
            f"{_pcts(user_reads)}",
            f"hydrate one user + 200 candidate items' features: {_pcts(full_reads)}",
            f"hydrate a heavy user ({len(online.user(heavy).realtime)} events in the window): {_pcts(heavy_reads)}",
            f"same user read through Feast get_online_features(ingress_v1): {_pcts(feast_reads)}",
        ]
    )
