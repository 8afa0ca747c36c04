"""End to end: `recserve serve` starts the real app on a local Ray (its own port and temp dir) in each
topology, over the session's Feast project on the real Redis; the tests drive it over HTTP."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pandas as pd
import pytest
import yaml

from pipeline.serving_cmd import port_open
from tests.conftest import ROOT

pytestmark = pytest.mark.integration

HTTP_PORT = 8011
RAY_PORT = 6391
METRICS_PORT = 8091
CONFIGS = {"colocated": "serve_config.yaml", "distributed": "serve_config.distributed.yaml"}


@pytest.fixture(scope="module", params=list(CONFIGS))
def app(request, small_bundle, slice_online, store_settings, tmp_path_factory):
    topology = request.param
    tmp = tmp_path_factory.mktemp(f"serve-{topology}")
    config = yaml.safe_load((ROOT / "deploy" / CONFIGS[topology]).read_text())
    config["http_options"]["port"] = HTTP_PORT
    args = config["applications"][0]["args"]
    args["bundle"] = str(small_bundle)
    args["store"] = {
        "redis": store_settings.redis,
        "project": store_settings.project,
        "registry": str(store_settings.registry),
    }
    path = tmp / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (tmp / "serve.log").open("w")
    env = {
        **os.environ,
        "RECSERVE_RAY_PORT": str(RAY_PORT),
        "RECSERVE_RAY_TMP": f"/tmp/recserve-ray-test-{os.getpid()}",
        "RECSERVE_METRICS_PORT": str(METRICS_PORT),
    }
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "serve", "--config", str(path), "--http-port", str(HTTP_PORT)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    text = ""
    while "recserve is up" not in text:
        text = (tmp / "serve.log").read_text()
        if proc.poll() is not None or time.monotonic() - started > 400:
            proc.kill()
            pytest.fail(f"recserve serve did not come up ({topology}):\n{text[-4000:]}")
        time.sleep(1)
    # The port a client uses: the ingress's direct port that `recserve serve` reports.
    url = re.search(r"HTTP: (http://127\.0\.0\.1:\d+) \(direct ingress\)", text)
    assert url, text[-2000:]
    client = httpx.Client(base_url=url[1], timeout=30)
    yield topology, client
    client.close()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(180) == 0
    text = (tmp / "serve.log").read_text()
    assert "recserve stopped" in text
    assert not port_open(RAY_PORT) and not port_open(HTTP_PORT)  # it took down the Ray it started


def recommend(client: httpx.Client, **body) -> httpx.Response:
    return client.post("/recommend", json=body)


def test_health_readiness_and_openapi(app):
    _, client = app
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["model_version"] == "slice-v1"
    assert "/recommend" in client.get("/openapi.json").json()["paths"]


def test_recommend_for_known_and_unknown_users(app, small_bundle):
    topology, client = app
    known = pd.read_parquet(small_bundle / "user_features.parquet")["user_id"].iloc[5]
    for user in (known, "someone-new"):
        r = recommend(client, user_id=user, k=8)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["user_id"] == user and body["model_version"] == "slice-v1"
        assert len({i["item_id"] for i in body["items"]}) == 8
        assert not body["degraded"], body["fallback_reason"]
        assert {"features", "cf", "content", "blend", "rules"} <= set(body["timings_ms"])
    r = client.post("/recommend", json={"user_id": known, "k": 3}, headers={"X-Request-ID": f"e2e-{topology}"})
    assert r.headers["x-request-id"] == f"e2e-{topology}" == r.json()["request_id"]


def test_exclude_and_query(app, small_bundle):
    _, client = app
    known = pd.read_parquet(small_bundle / "user_features.parquet")["user_id"].iloc[9]
    first = [i["item_id"] for i in recommend(client, user_id=known, k=5).json()["items"]]
    again = recommend(client, user_id=known, k=20, exclude=first).json()
    assert len(again["items"]) == 20 and not {i["item_id"] for i in again["items"]} & set(first)
    q = recommend(client, user_id=known, k=5, query="christmas decoration")
    assert q.status_code == 200 and len(q.json()["items"]) == 5 and not q.json()["degraded"], q.json()[
        "fallback_reason"
    ]


def test_an_event_changes_the_next_recommendation(app, small_bundle):
    topology, client = app
    catalog = pd.read_parquet(small_bundle / "catalog.parquet")
    family = catalog[catalog["description"].str.contains("HEART")]["item_id"].head(3).tolist()
    user = f"e2e-events-{topology}"
    before = recommend(client, user_id=user, k=10).json()
    events = [{"user_id": user, "item_id": i, "event_type": "view"} for i in family]
    posted = client.post("/events", json={"events": events})
    assert posted.status_code == 202 and posted.json()["accepted"] == 3
    after = recommend(client, user_id=user, k=10).json()
    assert not after["degraded"], after["fallback_reason"]
    assert [i["item_id"] for i in after["items"]] != [i["item_id"] for i in before["items"]]
    assert any(i["reason"].endswith("you viewed") for i in after["items"])


def test_similar_items(app, small_bundle):
    _, client = app
    item = pd.read_parquet(small_bundle / "catalog.parquet")["item_id"].iloc[0]
    r = client.get(f"/items/{item}/similar", params={"k": 5})
    assert r.status_code == 200 and len(r.json()["items"]) == 5
    assert client.get("/items/NOT-AN-ITEM/similar").status_code == 404


@pytest.mark.parametrize(
    ("content", "status", "field"),
    [
        (b'{"user_id": ', 400, "body"),
        (b'{"user_id": "1", "k": 1000}', 422, "k"),
        (b'{"user_id": "1", "k": "many"}', 422, "k"),
        (b'{"user_id": "1", "nope": 1}', 422, "nope"),
        (b'{"user_id": ""}', 422, "user_id"),
        (b'{"user_id": "' + b"x" * 2_000_000 + b'"}', 413, "body"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field(app, content, status, field):
    _, client = app
    r = client.post("/recommend", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text[:300]
    assert r.json()["field"] == field


def test_metrics_show_the_stage_histograms_after_traffic(app):
    topology, client = app
    for n in range(5):
        recommend(client, user_id=f"metrics-{n}", k=3)
    deadline = time.monotonic() + 90
    text = ""
    while time.monotonic() < deadline:
        try:
            text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5).text
        except httpx.HTTPError:
            text = ""
        wanted = [f'stage="{s}"' for s in ("features", "cf", "content", "blend", "rules")]
        if all(w in text for w in [*wanted, 'route="/recommend"', "recserve_model_info"]):
            break  # Ray's agent exports each metric on its own schedule
        time.sleep(3)
    assert "recserve_stage_latency_ms_bucket" in text
    for stage in ("features", "cf", "content", "blend", "rules"):
        assert f'stage="{stage}"' in text, stage
    assert "recserve_requests" in text and 'route="/recommend"' in text
    assert "recserve_model_info" in text and f'topology="{topology}"' in text
