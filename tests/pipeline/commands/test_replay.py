"""`recserve replay` answers logged requests exactly as the live service does, for the same bundle and events."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from pathlib import Path

import httpx
import pytest

from models.bundle import load_core
from pipeline.edge.api import build_api
from pipeline.serve.args import AppArgs
from pipeline.serve.local import make_api
from tests.conftest import recserve
from tests.support.keys import keyed

pytestmark = pytest.mark.integration


def requests_for(small_bundle: Path, online) -> list[dict]:
    """Known users with no events in the store (other tests post some), new users, queries, exclusions, events."""
    snap = load_core(small_bundle).snapshot
    users = [str(u) for u in snap.user_ids if not len(online.user(str(u)).realtime)][:3]
    items = [str(i) for i in snap.item_ids[:6]]
    ts = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=30)).isoformat()
    browse = [
        {"item_id": i, "event_type": t, "timestamp": ts}
        for i, t in zip(items[:3], ("view", "add_to_cart", "view"), strict=True)
    ]
    fresh = f"replay-{uuid.uuid4().hex[:8]}"
    return [
        {"user_id": users[0], "k": 10},
        {"user_id": users[1], "k": 5, "exclude": items[3:5], "query": "vintage mug"},
        {"user_id": fresh, "k": 10, "events": browse},
        {"user_id": f"never-{uuid.uuid4().hex[:8]}", "k": 20},
        {"user_id": f"q-{uuid.uuid4().hex[:8]}", "k": 10, "query": "christmas lights", "events": browse[:1]},
    ]


def test_replay_answers_as_the_live_service(small_bundle, slice_online, store_settings, tmp_path):
    reqs = requests_for(small_bundle, slice_online)
    api = make_api(AppArgs(bundle=small_bundle, store=store_settings, watch_store=False))
    keys, auth = keyed()
    app = build_api(lambda: api, keys=keys)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://live", headers=auth)

    async def live() -> list[dict]:
        out = []
        for r in reqs:
            events = [{**e, "user_id": r["user_id"]} for e in r.get("events", [])]
            if events:
                assert (await client.post("/events", json={"events": events})).status_code == 202
            body = {k: v for k, v in r.items() if k != "events"}
            got = await client.post("/recommend", json=body)
            assert got.status_code == 200, got.text
            out.append(got.json())
        return out

    answered = asyncio.run(live())
    (tmp_path / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reqs))
    run = recserve(
        "replay",
        "--requests",
        str(tmp_path / "requests.jsonl"),
        "--bundle",
        str(small_bundle),
        "--out",
        str(tmp_path / "answers.jsonl"),
    )
    assert run.returncode == 0, run.stderr
    replayed = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert len(replayed) == len(reqs)
    for want, got in zip(answered, replayed, strict=True):
        assert not want["degraded"], (want["user_id"], want["fallback_reason"], want["timings_ms"])
        for key in ("user_id", "model_version", "items", "degraded", "fallback_reason"):
            assert got[key] == want[key], (key, want["user_id"])


def test_a_bad_line_is_refused_by_line_and_field(small_bundle, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"user_id": "1", "k": 10}\n{"user_id": "2", "k": 0}\n')
    run = recserve(
        "replay",
        "--requests",
        str(tmp_path / "bad.jsonl"),
        "--bundle",
        str(small_bundle),
        "--out",
        str(tmp_path / "o.jsonl"),
    )
    assert run.returncode == 2 and "bad.jsonl:2: field 'k'" in run.stderr
