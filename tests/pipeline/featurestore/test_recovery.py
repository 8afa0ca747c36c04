"""Redis loss, end to end in one process: the Api as a replica builds it (`make_api`: real models on the slice
bundle, real Feast, its store watch and event-log flusher running) over a Redis of this module's own, port 6395,
with no persistence. Redis is stopped, then started empty, as a restart without persistence leaves it: the
replica says so within a second, answers degraded from the bundle meanwhile, and puts the store back by itself
(batch rows re-materialized, event windows rebuilt from the log) well within 10 s of Redis answering again."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from pipeline.edge.api import build_api
from pipeline.featurestore.store import materialize, open_store
from pipeline.serve.args import AppArgs
from pipeline.serve.local import make_api
from settings import StoreSettings
from tests.pipeline.conftest import catalog, manifest
from tests.support.keys import keyed
from tests.support.redis_server import OwnRedis

pytestmark = pytest.mark.integration

PORT = 6395
NO_PERSISTENCE = ("--appendonly", "no", "--save", "")


@pytest.fixture(scope="module")
def lost_redis(tmp_path_factory):
    server = OwnRedis(PORT, tmp_path_factory.mktemp("redis-6395"), NO_PERSISTENCE)
    server.start()
    yield server
    server.stop()


def test_a_redis_restart_without_persistence_is_detected_served_degraded_and_recovered(
    lost_redis, small_bundle, tmp_path
):
    settings = StoreSettings(
        redis=f"127.0.0.1:{PORT}",
        project="recovery_drill",
        registry=tmp_path / "registry.db",
        event_log_dir=tmp_path / "event_log",
        event_log_flush_s=0.5,
    )
    materialize(open_store(settings), settings, small_bundle, manifest(small_bundle))
    api = make_api(AppArgs(bundle=small_bundle, store=settings))
    keys, auth = keyed()
    app = build_api(lambda: api, keys=keys)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://replica", headers=auth)
    known = "12347" if "12347" in set(api.chain.snapshot.user_ids.tolist()) else str(api.chain.snapshot.user_ids[0])
    fresh = "recovery-new-user"
    viewed = [i for i in catalog(small_bundle) if i in api.known_items][:3]

    async def recommend(user: str) -> dict:
        r = await http.post("/recommend", json={"user_id": user, "k": 10})
        assert r.status_code == 200, r.text
        return r.json()

    async def until(predicate, timeout_s: float, what: str) -> float:
        began = time.monotonic()
        while not await predicate():
            assert time.monotonic() - began < timeout_s, f"{what} not within {timeout_s} s"
            await asyncio.sleep(0.05)
        return time.monotonic() - began

    async def scenario() -> dict:
        await api.start()
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["feature_store"] == "ok", ready.text
        assert ready.json()["persistence"] == "none" and "warning" in ready.json()
        assert not (await recommend(known))["degraded"]
        events = [{"user_id": fresh, "item_id": i, "event_type": "view"} for i in viewed]
        assert (await http.post("/events", json={"events": events})).status_code == 202
        await asyncio.sleep(1.5)  # the flusher (every 0.5 s here) has put the window in the log's files
        assert api.event_log is not None and api.event_log.backlog() == 0

        # Down: every answer still comes, from the bundle, flagged; readiness says why.
        await asyncio.to_thread(lost_redis.shutdown)
        down_for = await until(lambda: _readyz_is(http, 503, "unreachable"), 1.5, "readyz naming the unreachable store")
        r = await recommend(known)
        assert r["degraded"] and "feature_store_unavailable" in r["fallback_reason"]

        # Back, but empty: the replica notices within a second, serves degraded, then restores the store itself.
        await asyncio.to_thread(lost_redis.start)
        back = time.monotonic()
        seen_empty = {"answer": None}

        async def degraded_empty() -> bool:
            body = await recommend(known)
            if body["degraded"] and "feature_store_empty" in (body["fallback_reason"] or ""):
                seen_empty["answer"] = time.monotonic() - back
            return seen_empty["answer"] is not None or not body["degraded"]

        await until(degraded_empty, 2.0, "a degraded answer or a recovered one")
        recovered = await until(lambda: _not_degraded(recommend, known), 10.0, "answers not degraded")
        recovered_s = time.monotonic() - back
        ready = await http.get("/readyz")
        after = await recommend(fresh)
        await api.stop()
        await http.aclose()
        return {
            "down_detected_s": down_for,
            "empty_seen_s": seen_empty["answer"],
            "recovered_s": recovered_s,
            "recovered_wait_s": recovered,
            "ready": ready,
            "fresh": after,
        }

    out = asyncio.run(scenario())
    print(
        f"Redis down: readyz 503 after {out['down_detected_s']:.2f} s; Redis back empty: degraded "
        f"feature_store_empty at {out['empty_seen_s']} s, answers whole again {out['recovered_s']:.2f} s after "
        f"Redis answered; recoveries {api.watch.recoveries if api.watch else 0}"
    )
    assert out["recovered_s"] <= 10.0
    assert out["ready"].status_code == 200 and out["ready"].json()["feature_store"] == "ok"
    assert api.watch is not None and api.watch.recoveries == 1
    # The new user's views, accepted before the loss, were rebuilt from the event log and steer the answer again.
    assert not out["fresh"]["degraded"] and any(i["reason"].endswith("you viewed") for i in out["fresh"]["items"])


async def _readyz_is(http: httpx.AsyncClient, status: int, state: str) -> bool:
    r = await http.get("/readyz")
    return r.status_code == status and r.json().get("feature_store") == state


async def _not_degraded(recommend, user: str) -> bool:
    return not (await recommend(user))["degraded"]


def test_a_brand_new_deployment_fills_its_empty_store_by_itself(lost_redis, small_bundle, tmp_path):
    # An empty Redis and a registry that does not exist yet (a first deploy): no `recserve features materialize`
    # ran. The watch must restore the bundle's rows (registering the definitions) and the replica become ready.
    lost_redis.client().flushall()
    settings = StoreSettings(
        redis=f"127.0.0.1:{PORT}",
        project="fresh_deploy",
        registry=tmp_path / "never-applied" / "registry.db",
        event_log_dir=tmp_path / "event_log",
    )
    api = make_api(AppArgs(bundle=small_bundle, store=settings))
    app = build_api(lambda: api)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://replica")

    async def scenario() -> float:
        await api.start()
        began = time.monotonic()
        while not await _readyz_is(http, 200, "ok"):
            assert time.monotonic() - began < 60, (await http.get("/readyz")).text
            await asyncio.sleep(0.1)
        took = time.monotonic() - began
        r = await http.post("/recommend", json={"user_id": str(api.chain.snapshot.user_ids[0]), "k": 5})
        assert r.status_code == 200 and not r.json()["degraded"], r.text
        await api.stop()
        await http.aclose()
        return took

    print(f"a first deploy on an empty store was ready {asyncio.run(scenario()):.1f} s after start")
    assert (tmp_path / "never-applied" / "registry.db").is_file()


def test_the_watch_reports_each_state_it_sees(tmp_path):
    """What the replica's feature-store gauge receives: the real Redis with and without the bundle's marker, and a
    port where nothing answers."""
    import uuid

    from pipeline.featurestore.recovery import StoreWatch

    seen: list[str] = []
    settings = StoreSettings(project=f"watch_{uuid.uuid4().hex[:12]}", registry=tmp_path / "registry.db")
    watch = StoreWatch(settings, "v1", materialize=lambda: None, report=seen.append)
    assert watch.check().state == "empty"
    watch.client.set(watch.marker, "{}")
    try:
        assert watch.check().state == "ok"
    finally:
        watch.client.delete(watch.marker)
    down = settings.model_copy(update={"redis": "127.0.0.1:1"})
    assert StoreWatch(down, "v1", materialize=lambda: None, report=seen.append).check().state == "unreachable"
    assert seen == ["empty", "ok", "unreachable"]
