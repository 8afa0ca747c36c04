"""The ingress's logic without Ray: real models on the slice bundle, real Redis and Feast, the real HTTP app
(over httpx's ASGI transport). Every fallback path answers 200 with k items and says why."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest

from chain.knobs import Chaos, Knobs
from chain.recommend import Chain
from chain.retrieve import CFStage, ContentStage
from chain.runtimes import LocalStages
from chain.score import BlendStage
from chain.types import Query
from models.blender import Blender
from models.bundle import load_core, verified
from models.cf import ALSModel
from models.content import ContentModel
from pipeline.edge.api import Api, build_api
from pipeline.featurestore.events import EventSettings, EventWriter
from pipeline.featurestore.store import OnlineFeatures, open_store
from pipeline.serve.metrics import NullRecorder
from settings import StoreSettings
from tests.support.keys import keyed

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def core(small_bundle):
    return load_core(small_bundle)


@pytest.fixture(scope="module")
def stages(small_bundle):
    path, _, settings = verified(small_bundle)
    return LocalStages(
        CFStage(ALSModel.load(path, settings.cf)),
        ContentStage(ContentModel.load(path)).warm(),
        BlendStage(Blender.load(path)),
    )


def service(core, online, stages, **knobs) -> Chain:
    return Chain(core, online, stages, Knobs(**knobs), NullRecorder())


@pytest.fixture(scope="module")
def api(core, slice_online, stages, feature_store, store_settings) -> Api:
    settings = EventSettings()
    return Api(
        service(core, slice_online, stages),
        store_settings,
        settings,
        lambda: EventWriter(feature_store, store_settings, settings),
    )


def run(coro):
    return asyncio.run(coro)


def known_user(core) -> str:
    u = int(np.argmax(core.snapshot.user_matrix[:, 1]))  # the most orders: a rich history
    return str(core.snapshot.user_ids[u])


def test_a_known_user_gets_k_distinct_blended_items(api, core):
    r = run(api.chain.recommend(Query(known_user(core), k=10)))
    assert not r.degraded and r.fallback_reason is None
    ids = [i.item_id for i in r.items]
    assert len(ids) == 10 == len(set(ids)) and set(ids) <= set(core.snapshot.item_ids)
    assert all(i.reason for i in r.items) and any("history" in i.sources or "cf" in i.sources for i in r.items)
    assert {"features", "cf", "content", "blend", "rules", "total"} <= set(r.timings_ms)
    assert r.model_version == "slice-v1" and r.candidates > 10


def test_exclusions_and_large_k_are_honoured(api, core):
    user = known_user(core)
    first = run(api.chain.recommend(Query(user, k=5)))
    excluded = tuple(i.item_id for i in first.items)
    r = run(api.chain.recommend(Query(user, k=100, exclude=excluded)))
    ids = [i.item_id for i in r.items]
    assert len(ids) == 100 == len(set(ids)) and not set(ids) & set(excluded)


def test_events_steer_a_new_users_cold_start(api, core):
    cold = run(api.chain.recommend(Query("brand-new-e2e-user", k=10)))
    assert [i.sources for i in cold.items] == [("popularity",)] * 10 and not cold.degraded
    # Three views of one product family: the next answer must follow them, with a reason that says so.
    items = core.snapshot.item_ids
    family = [str(i) for i, d in zip(items, core.snapshot.descriptions, strict=True) if "CHRISTMAS" in d][:3]
    assert api.events([{"user_id": "steered-user", "item_id": i, "event_type": "view"} for i in family]) == 3
    r = run(api.chain.recommend(Query("steered-user", k=10)))
    assert not r.degraded
    assert any("content" in i.sources or "cf" in i.sources for i in r.items)
    assert any(i.reason.endswith("you viewed") for i in r.items)
    assert [i.item_id for i in r.items] != [i.item_id for i in cold.items]


@pytest.mark.parametrize(
    ("chaos", "reason"),
    [
        (Chaos(stage="cf", mode="error"), "cf_error"),
        (Chaos(stage="content", mode="delay", delay_ms=300), "content_timeout"),
        (Chaos(stage="blend", mode="error"), "blend_error"),
        (Chaos(stage="blend", mode="delay", delay_ms=300), "blend_timeout"),
    ],
)
def test_a_failing_or_stalled_stage_degrades_to_a_full_answer(core, slice_online, stages, chaos, reason):
    svc = service(core, slice_online, stages, chaos=chaos, deadline_ms=80)
    r = run(svc.recommend(Query(known_user(core), k=10)))
    assert r.degraded and reason in r.fallback_reason.split(",")
    assert len({i.item_id for i in r.items}) == 10
    assert r.timings_ms["total"] < 80 + 40  # answered near the deadline, not after the stalled stage


def test_with_a_query_content_may_take_until_the_blenders_share(core, slice_online, stages):
    # A 200 ms deadline: retrieval's share ends at 100 ms, the blender's at 170. Content stalled 120 ms (plus the
    # query's encoding, about 20 ms).
    chaos = Chaos(stage="content", mode="delay", delay_ms=120)
    svc = service(core, slice_online, stages, chaos=chaos, deadline_ms=200)
    plain = run(svc.recommend(Query(known_user(core), k=5)))
    assert plain.degraded and "content_timeout" in plain.fallback_reason.split(",")
    asked = run(svc.recommend(Query(known_user(core), k=5, query="christmas decoration")))
    assert not asked.degraded, asked.fallback_reason
    assert all("content" in i.sources for i in asked.items)


def test_redis_down_serves_bundle_features_degraded(core, stages, slice_online):
    dead = StoreSettings(redis="127.0.0.1:1", project="unreachable")
    offline = OnlineFeatures(dead, core.version, slice_online.item_ids, slice_online.item_matrix)
    svc = service(core, offline, stages)
    user = known_user(core)
    r = run(svc.recommend(Query(user, k=10)))
    assert r.degraded and r.fallback_reason == "feature_store_unavailable"
    assert len({i.item_id for i in r.items}) == 10
    assert any("history" in i.sources for i in r.items)  # the bundle still knows the user
    healthy = run(service(core, slice_online, stages).recommend(Query(user, k=10)))
    assert [i.item_id for i in r.items] == [i.item_id for i in healthy.items]  # the same features, from the bundle


@pytest.fixture(scope="module")
def http(api):
    keys, auth = keyed()
    app = build_api(lambda: api, max_body_bytes=4096, keys=keys)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://recserve", headers=auth)


def call(http, method: str, url: str, **kw) -> httpx.Response:
    async def go() -> httpx.Response:
        return await http.request(method, url, **kw)

    return run(go())


@pytest.mark.parametrize(
    ("body", "status", "field", "words"),
    [
        (b'{"user_id": "1",', 400, "body", "not valid JSON"),
        ({"user_id": "12347", "k": "ten"}, 422, "k", "valid integer"),
        ({"user_id": "12347", "k": 0}, 422, "k", "greater than or equal to 1"),
        ({"user_id": "12347", "k": 101}, 422, "k", "less than or equal to 100"),
        ({"user_id": 12347}, 422, "user_id", "valid string"),
        ({"user_id": ""}, 422, "user_id", "at least 1 character"),
        ({"user_id": "12347", "colour": "red"}, 422, "colour", "is not a field of this request"),
        ({"k": 3}, 422, "user_id", "is required"),
        ({"user_id": "x" * 5000}, 413, "body", "limit is 4096"),
    ],
)
def test_bad_recommend_requests_get_a_4xx_naming_the_field(http, body, status, field, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = call(http, "POST", "/recommend", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["field"] == field and words in r.json()["error"]
    assert r.headers["x-request-id"] == r.json()["request_id"]


def test_events_and_similar_over_http(http, core):
    item = str(core.snapshot.item_ids[0])
    ok = call(
        http,
        "POST",
        "/events",
        json={"events": [{"user_id": "h1", "item_id": item, "event_type": "view"}]},
        headers={"X-Request-ID": "caller-42"},
    )
    assert ok.status_code == 202 and ok.json() == {"request_id": "caller-42", "accepted": 1}
    assert ok.headers["x-request-id"] == "caller-42"
    bad = call(http, "POST", "/events", json={"events": [{"user_id": "h1", "item_id": item, "event_type": "click"}]})
    assert bad.status_code == 422 and bad.json()["field"] == "event_type"
    assert bad.json()["error"].startswith("events[0].event_type")
    similar = call(http, "GET", f"/items/{item}/similar", params={"k": 7})
    assert similar.status_code == 200 and len(similar.json()["items"]) == 7
    assert item not in {i["item_id"] for i in similar.json()["items"]}
    assert call(http, "GET", "/items/NOPE/similar").status_code == 404
    assert call(http, "GET", "/items/{item}/similar", params={"k": 0}).status_code == 422
    ready = call(http, "GET", "/readyz")  # the first call warms every path
    assert ready.status_code == 200 and ready.json()["ready"] is True
    ready = call(http, "GET", "/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True


def test_with_redis_down_the_http_api_still_answers_and_says_so(core, stages, slice_online, small_bundle):
    dead = StoreSettings(redis="127.0.0.1:1", project="unreachable")
    offline = OnlineFeatures(dead, core.version, slice_online.item_ids, slice_online.item_matrix)
    api = Api(
        service(core, offline, stages),
        dead,
        EventSettings(),
        lambda: EventWriter(open_store(dead), dead, EventSettings()),
    )
    keys, auth = keyed()
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=build_api(lambda: api, keys=keys)), base_url="http://r", headers=auth
    )
    r = call(client, "POST", "/recommend", json={"user_id": known_user(core), "k": 10})
    assert r.status_code == 200 and r.json()["degraded"] and r.json()["fallback_reason"] == "feature_store_unavailable"
    assert len(r.json()["items"]) == 10
    assert call(client, "GET", "/readyz").status_code == 503
    item = str(core.snapshot.item_ids[0])
    ev = call(client, "POST", "/events", json={"events": [{"user_id": "u", "item_id": item, "event_type": "view"}]})
    assert ev.status_code == 503 and ev.headers["retry-after"] == "1" and "deploy/ensure-redis.sh" in ev.json()["error"]


def test_knobs_change_without_a_restart(core, slice_online, stages):
    svc = service(core, slice_online, stages)
    user = known_user(core)
    wide = run(svc.recommend(Query(user, k=5)))
    svc.reconfigure(Knobs(n_cf=5, n_content=5, n_history=5, n_popular=5))
    narrow = run(svc.recommend(Query(user, k=5)))
    assert narrow.candidates <= 20 < wide.candidates
    svc.reconfigure(Knobs(chaos=Chaos(stage="cf", mode="error")))
    assert "cf_error" in run(svc.recommend(Query(user, k=5))).fallback_reason


def test_past_the_in_flight_limit_requests_are_shed_with_retry_after_and_service_resumes(
    core, slice_online, stages, feature_store, store_settings
):
    # Two requests stall in a stage (chaos delay); the third finds the replica full and is shed at once.
    settings = EventSettings()
    svc = service(
        core,
        slice_online,
        stages,
        max_in_flight=2,
        deadline_ms=2000,
        chaos=Chaos(stage="cf", mode="delay", delay_ms=300),
    )
    api = Api(svc, store_settings, settings, lambda: EventWriter(feature_store, store_settings, settings))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_api(lambda: api)), base_url="http://r")
    body = {"user_id": known_user(core), "k": 5}

    async def burst() -> list[httpx.Response]:
        slow = [asyncio.create_task(client.post("/recommend", json=body)) for _ in range(2)]
        await asyncio.sleep(0.05)
        shed = await client.post("/recommend", json=body)
        healthz = await client.get("/healthz")  # not work: never shed
        return [*await asyncio.gather(*slow), shed, healthz]

    first, second, shed, healthz = run(burst())
    assert first.status_code == second.status_code == 200 and healthz.status_code == 200
    assert shed.status_code == 503 and shed.headers["retry-after"] == "1"
    assert "at capacity (2 requests in flight" in shed.json()["error"]
    assert shed.headers["x-request-id"] == shed.json()["request_id"]
    svc.reconfigure(Knobs(max_in_flight=2))
    assert call(client, "POST", "/recommend", json=body).status_code == 200  # nothing stays counted


def test_a_failing_stage_is_skipped_after_three_failures_then_probed_in_the_background(core, slice_online, stages):
    s = service(core, slice_online, stages, chaos=Chaos(stage="cf", mode="error"), breaker_open_s=0.3)

    async def requests() -> list[str | None]:
        reasons = [(await s.recommend(Query(f"breaker-{n}", k=5))).fallback_reason for n in range(4)]
        await asyncio.sleep(0.35)
        # Half-open: this request starts the probe and does not wait for it; the probe fails (chaos): open again
        reasons.append((await s.recommend(Query("breaker-probe", k=5))).fallback_reason)
        await asyncio.sleep(0.05)
        reasons.append(s._breakers["cf"].state)
        s.reconfigure(s.knobs.model_copy(update={"chaos": None}))
        await asyncio.sleep(0.35)
        reasons.append((await s.recommend(Query("breaker-probe-again", k=5))).fallback_reason)
        await asyncio.sleep(0.05)  # the probe answers: closed
        r = await s.recommend(Query("breaker-healed", k=5))
        assert not r.degraded and len(r.items) == 5
        return reasons

    reasons = run(requests())
    assert reasons[:3] == ["cf_error"] * 3 and reasons[3] == "cf_unavailable"  # open: no call at all
    assert reasons[4:] == ["cf_unavailable", "open", "cf_unavailable"]
