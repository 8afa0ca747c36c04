"""End to end: `recserve serve` starts the real app on a local Ray (its own port and temp dir) in each
topology, over the session's Feast project on the real Redis; the tests drive it over HTTP."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pandas as pd
import pytest

from chain.rollout import ArmSpec, RolloutSpec, assign
from pipeline.commands.serve import http_get, ingress_replicas_up, ingress_servers_up, port_open
from settings import ServeSettings
from tests.conftest import ROOT, recserve
from tests.support.app import serve_config, serving, settings_env
from tests.support.keys import bearer, new_key
from tests.support.load import open_loop

pytestmark = pytest.mark.integration

CONFIGS = {"colocated": "serve_config.yaml", "distributed": "serve_config.distributed.yaml"}
HTTP_PORT = 8011
# Every port and folder of the test's own Ray, Serve and HAProxy: off the defaults, so a running demo (`make demo`)
# and these tests never meet (loadtests/isolation.py checks that in CI).
SETTINGS = ServeSettings(
    ray_port=6391,
    ray_tmp=Path(f"/tmp/recserve-ray-test-{os.getpid()}"),
    haproxy_dir=Path(f"/tmp/rs-hap-test-{os.getpid()}"),
    metrics_port=8091,
    dashboard_port=8276,
    dashboard_agent_port=52376,
    client_server_port=10011,
    worker_ports="20002-20999",
    direct_ports="31000-31099",
    direct_grpc_ports="41000-41099",
    fallback_proxy_port=8511,
    fallback_grpc_port=9511,
    haproxy_stats_port=8414,
    haproxy_metrics_port=9111,
)
# The run's own API key, configured inline (no keys file is read), and sent by the client and `recserve rollout`.
KEY, KEY_ENTRY = new_key("e2e", "admin")
SETTINGS_ENV = {
    **settings_env(SETTINGS),
    "RECSERVE_API_KEYS": KEY_ENTRY,
    "RECSERVE_API_KEYS_FILE": f"/tmp/recserve-e2e-no-keys-file-{os.getpid()}",
    "RECSERVE_API_KEY": KEY,
}


@dataclass(frozen=True)
class App:
    topology: str
    client: httpx.Client
    url: str


@pytest.fixture(scope="module", params=list(CONFIGS))
def app(request, small_bundle, slice_online, store_settings, tmp_path_factory):
    topology = request.param
    config = serve_config(CONFIGS[topology], HTTP_PORT, small_bundle, store_settings)
    with serving(config, tmp_path_factory.mktemp(f"serve-{topology}"), SETTINGS_ENV) as served:
        client = httpx.Client(base_url=served.url, timeout=30, headers=bearer(KEY))
        yield App(topology, client, served.url)
        client.close()
    assert served.proc.returncode == 0
    assert "recserve stopped" in served.log.read_text()
    # It took down exactly what it started: its Ray, HAProxy and replicas' ports are all closed.
    for port in (SETTINGS.ray_port, HTTP_PORT, SETTINGS.haproxy_stats_port, SETTINGS.fallback_proxy_port, 31000):
        assert not port_open(port), port


def replicas(deployment: str) -> list[dict]:
    """The deployment's live replicas (pid, name) from Ray's actor table."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.support.ray_replicas",
            f"--address=127.0.0.1:{SETTINGS.ray_port}",
            f"--deployment={deployment}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def wait_for(predicate, timeout_s: float, what: str) -> float:
    began = time.monotonic()
    while not predicate():
        assert time.monotonic() - began < timeout_s, f"{what} not within {timeout_s:.0f} s"
        time.sleep(0.5)
    return time.monotonic() - began


JSON = {"Content-Type": "application/json"}


def recommend(client: httpx.Client, **body) -> httpx.Response:
    return client.post("/recommend", json=body)


def test_health_readiness_and_openapi(app):
    client = app.client
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["model_version"] == "slice-v1"
    assert "/recommend" in client.get("/openapi.json").json()["paths"]


def test_recommend_for_known_and_unknown_users(app, small_bundle):
    topology, client = app.topology, app.client
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
    client = app.client
    known = pd.read_parquet(small_bundle / "user_features.parquet")["user_id"].iloc[9]
    first = [i["item_id"] for i in recommend(client, user_id=known, k=5).json()["items"]]
    again = recommend(client, user_id=known, k=20, exclude=first).json()
    assert len(again["items"]) == 20 and not {i["item_id"] for i in again["items"]} & set(first)
    q = recommend(client, user_id=known, k=5, query="christmas decoration")
    assert q.status_code == 200 and len(q.json()["items"]) == 5 and not q.json()["degraded"], q.json()[
        "fallback_reason"
    ]


def test_an_event_changes_the_next_recommendation(app, small_bundle):
    topology, client = app.topology, app.client
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


def test_events_and_admin_need_a_key_through_serve(app, small_bundle):
    item = pd.read_parquet(small_bundle / "catalog.parquet")["item_id"].iloc[0]
    body = {"events": [{"user_id": "e2e-no-key", "item_id": item, "event_type": "view"}]}
    for headers in ({}, bearer("not-a-key")):
        r = httpx.post(f"{app.url}/events", json=body, headers=headers, timeout=30)
        assert r.status_code == 401, r.text
        assert r.json()["request_id"] == r.headers["x-request-id"] and r.json()["field"] == "Authorization"
        assert r.headers["www-authenticate"].startswith("Bearer")
    admin = app.client.get("/admin/rollout")
    assert admin.status_code == 200 and admin.json()["arms"] == app.client.get("/readyz").json()["arms"]


def test_similar_items(app, small_bundle):
    client = app.client
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
    client = app.client
    r = client.post("/recommend", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text[:300]
    assert r.json()["field"] == field


def test_through_serve_the_edge_answers_in_one_shape_with_one_request_id(app):
    """Serve's own middleware echoes the request's X-Request-ID after the app answers; the gate recserve serve
    installs in front of it makes an invalid one valid, so header and body agree, errors included."""
    client = app.client
    for method, path, kw in [
        ("POST", "/recommend", {"json": {"user_id": "12347", "k": 2}}),
        ("GET", "/nope", {}),
        ("GET", "/recommend", {}),
        ("POST", "/recommend", {"content": b'{"user_id":"12\xff47","k":3}', "headers": JSON}),
    ]:
        headers = {"X-Request-ID": "has spaces in it", **kw.pop("headers", {})}
        r = client.request(method, path, headers=headers, **kw)
        (rid,) = r.headers.get_list("x-request-id")
        assert rid != "has spaces in it" and r.json()["request_id"] == rid, (path, r.status_code, r.text[:300])
        assert r.status_code == 200 or set(r.json()) == {"request_id", "error", "field"}, r.text[:300]

    def chunks():
        for _ in range(20):
            yield b"x" * 100_000

    big = client.post("/recommend", content=chunks(), headers=JSON)  # chunked: no Content-Length
    assert big.status_code == 413 and big.json()["field"] == "body", big.text[:300]
    # The same keep-alive connection carries the next request: the edge read the refused body to its end (HAProxy
    # had closed such connections silently; 12 of 60 requests after a chunked 413 failed with no answer).
    for _ in range(20):
        assert client.post("/recommend", content=chunks(), headers=JSON).status_code == 413
        assert client.post("/recommend", json={"user_id": "12347", "k": 2}).status_code == 200


def test_metrics_show_the_stage_histograms_after_traffic(app):
    topology, client = app.topology, app.client
    for n in range(5):
        recommend(client, user_id=f"metrics-{n}", k=3)
    deadline = time.monotonic() + 90
    text = ""
    while time.monotonic() < deadline:
        try:
            text = httpx.get(f"http://127.0.0.1:{SETTINGS.metrics_port}/metrics", timeout=5).text
        except httpx.HTTPError:
            text = ""
        wanted = [f'stage="{s}"' for s in ("features", "cf", "content", "blend", "rules")]
        # Everything asserted below: Ray's agent exports each metric on its own schedule (a counter can come a
        # round after the histogram of the same requests).
        wanted += ["recserve_stage_latency_ms_bucket", "recserve_requests", 'route="/recommend"', "recserve_model_info"]
        if all(w in text for w in wanted):
            break
        time.sleep(3)
    assert "recserve_stage_latency_ms_bucket" in text
    for stage in ("features", "cf", "content", "blend", "rules"):
        assert f'stage="{stage}"' in text, stage
    assert "recserve_requests" in text and 'route="/recommend"' in text
    assert "recserve_model_info" in text and f'topology="{topology}"' in text


MODEL_DEPLOYMENTS = ("CollaborativeFilter", "ContentModel", "Blender")


def test_a_rollout_changes_the_arms_without_restarting_a_replica(app, small_bundle, second_bundle, second_online):
    """Colocated, each Ingress replica loads the new bundle; distributed, the model deployments load it through
    Serve's model multiplexing. Either way no replica restarts."""
    env = SETTINGS_ENV
    deployments = ("Ingress", *(MODEL_DEPLOYMENTS if app.topology == "distributed" else ()))
    before = {d: sorted(r["pid"] for r in replicas(d)) for d in deployments}
    out = recserve("rollout", "start", "--bundle", str(second_bundle), "--ab", "50", "--url", app.url, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "champion slice-v1:" in out.stdout and "candidate slice-v2:" in out.stdout  # both offline tables
    spec = RolloutSpec(
        salt="slice-v2",
        arms=(
            ArmSpec(name="champion", bundle="a", weight=50, role="champion"),
            ArmSpec(name="challenger", bundle="b", weight=50),
        ),
    )
    versions = {"champion": "slice-v1", "challenger": "slice-v2"}
    seen = set()
    for user in _users(small_bundle)[:60]:
        body = recommend(app.client, user_id=user, k=3).json()
        assert body["arm"] == assign(user, spec).name, (user, body["arm"])
        assert body["model_version"] == versions[body["arm"]]
        seen.add(body["arm"])
    assert seen == {"champion", "challenger"}
    assert {d: sorted(r["pid"] for r in replicas(d)) for d in deployments} == before  # in place, not restarted
    status = recserve("rollout", "status", "--url", app.url, env=env)
    assert status.returncode == 0 and "challenger" in status.stdout and "slice-v2" in status.stdout, status.stdout
    back = recserve("rollout", "rollback", "--url", app.url, env=env)
    assert back.returncode == 0, back.stderr[-3000:]
    for user in _users(small_bundle)[:20]:
        body = recommend(app.client, user_id=user, k=3).json()
        assert (body["arm"], body["model_version"]) == ("champion", "slice-v1")


def test_a_rollout_change_keeps_every_ingress_replica_in_the_balancer(app):
    """A user_config change marks each ingress replica UPDATING in turn; with Serve's default (list changes applied
    0.1 s after the first) HAProxy dropped each from its backends and put it back, so the other took every request
    meanwhile. recserve serve gathers the list's changes for haproxy_coalesce_s: HAProxy's stats page shows every
    ingress replica UP throughout a change (read every 50 ms from the ask to 4 s after it serves)."""
    from pipeline.commands.rollout import current_spec, deploy

    wait_for(lambda: ingress_replicas_up(SETTINGS.haproxy_stats_port) >= 1, 120, "an ingress replica UP")
    before = ingress_replicas_up(SETTINGS.haproxy_stats_port)
    spec = current_spec({}, app.url)  # the champion /readyz names, alone: a change that loads nothing
    readings: list[int] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            up = ingress_servers_up(SETTINGS.haproxy_stats_port, 1.0)
            if up is not None:  # a reload's hand-over may miss a read; a reading is what a running HAProxy says
                readings.append(up)
            time.sleep(0.05)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        for n in range(2):
            deploy(spec.model_copy(update={"salt": f"e2e-balancer-{n}-{time.time_ns()}"}), app.url, 300.0, SETTINGS)
            time.sleep(4.0)  # past HAProxy's last reload for the change
    finally:
        stop.set()
        reader.join(5)
    assert len(readings) > 50, readings
    assert min(readings) >= before, f"{before} ingress replicas UP before the change; readings {readings}"


def test_a_failing_canary_is_rolled_back_on_every_replica_and_counted_once(app, small_bundle, second_bundle):
    """Through Serve: a canary whose blender fails on purpose (its own chaos knob) is rolled back by whichever
    replica judges first; every replica follows through Redis; the metric counts the event once."""
    from pipeline.commands.rollout import deploy

    spec = RolloutSpec(
        salt=f"e2e-guard-{time.time_ns()}",
        arms=(
            ArmSpec(name="champion", bundle=str(small_bundle), weight=50, role="champion"),
            ArmSpec(
                name="canary",
                bundle=str(second_bundle),
                weight=50,
                role="canary",
                knobs={"chaos": {"stage": "blend", "mode": "error"}},
            ),
        ),
    )
    deploy(spec, app.url, 300.0, SETTINGS)
    users = _users(small_bundle)
    began = time.monotonic()

    def rolled_back() -> bool:
        for u in users[:40]:
            recommend(app.client, user_id=u, k=3)
        shown = [json.loads(http_get(f"{app.url}/readyz", 5.0)[1])["arms"]["canary"] for _ in range(6)]
        return all(a["rolled_back"] and a["share"] == 0.0 for a in shown)

    wait_for(rolled_back, 60.0, "the canary rolled back on every replica")
    took = time.monotonic() - began
    assert {recommend(app.client, user_id=u, k=3).json()["arm"] for u in users[:40]} == {"champion"}

    def counted() -> float:
        text = httpx.get(f"http://127.0.0.1:{SETTINGS.metrics_port}/metrics", timeout=5).text
        found = re.findall(r'^ray_recserve_rollbacks_total\{[^}]*arm="canary"[^}]*\} ([0-9.e+]+)$', text, re.M)
        return sum(float(v) for v in found)

    wait_for(lambda: counted() > 0, 30.0, "recserve_rollbacks exported")
    assert counted() == 1.0
    _report(f"e2e canary guard: a failing canary rolled back on every replica {took:.1f} s after its deploy")
    back = recserve("rollout", "rollback", "--url", app.url, env=SETTINGS_ENV)
    assert back.returncode == 0, back.stderr[-3000:]


# The lifecycle drills run last in the module: they kill replicas of the app the tests above used.


def _users(small_bundle) -> list[str]:
    known = pd.read_parquet(small_bundle / "user_features.parquet")["user_id"].head(200).tolist()
    return [*known, *(f"drill-new-{n}" for n in range(20))]


def _report(line: str) -> None:
    """Print a drill's figures and keep them in reports/drills.log, since pytest shows no output of a passing test."""
    print(line)
    path = ROOT / "reports" / "drills.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        out.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")


def _summary(run) -> str:
    codes: dict[str, int] = {}
    for o in run.outcomes:
        key = str(o.status) if o.status else o.error
        codes[key] = codes.get(key, 0) + 1
    degraded = sum(o.degraded for o in run.outcomes)
    return f"{len(run.outcomes)} requests, {codes}, degraded {degraded}, p99 {run.p99_ms():.0f} ms"


def _serving(replica: dict) -> bool:
    """Whether HAProxy has a request in flight on the replica: its server's current sessions on the stats page (the
    actor SERVE_REPLICA::recserve#Ingress#<id> is the server SERVE_REPLICA_recserve-Ingress-<id>)."""
    code, text = http_get(f"http://127.0.0.1:{SETTINGS.haproxy_stats_port}/stats;csv", 1.0)
    rid = replica["name"].rsplit("#", 1)[1]
    rows = [r.split(",") for r in text.splitlines() if not r.startswith("#")]
    return code == 200 and any(len(r) > 4 and r[1].endswith(f"-{rid}") and int(r[4] or 0) > 0 for r in rows)


def test_killing_an_ingress_replica_under_load_fails_no_request(app, small_bundle):
    if app.topology != "colocated":
        pytest.skip("distributed runs one ingress replica; its drill kills a model replica")
    wait_for(lambda: ingress_replicas_up(SETTINGS.haproxy_stats_port) >= 2, 120, "two ingress replicas UP")
    live = replicas("Ingress")
    if len(live) < 2:
        pytest.skip("one core: the colocated app runs a single ingress replica")
    users = _users(small_bundle)
    began = time.monotonic()
    thread, run = open_loop(app.url, 40, 20, lambda i: {"user_id": users[i % len(users)], "k": 10})
    time.sleep(6)
    # Killed while it serves a request, the hard case: HAProxy has sent it that request and must replay it.
    deadline = time.monotonic() + 5
    while not _serving(live[0]):
        assert time.monotonic() < deadline, "no request in flight on the replica within 5 s"
    killed_at = time.monotonic() - began
    os.kill(live[0]["pid"], signal.SIGKILL)
    thread.join(90)
    _report(f"ingress replica {live[0]['pid']} killed at t={killed_at:.1f} s under 40 req/s: {_summary(run)}")
    assert len(run.outcomes) == 800
    # The bar: no request fails. The one in flight on the killed replica is replayed on the other by HAProxy, which
    # has each request whole before it picks a replica (pipeline/serve/haproxy_wrapper.sh); without that it was lost.
    # What no proxy can replay: an answer the replica had begun to send when it died (HAProxy had forwarded its
    # head; the client sees the body cut short). Seen once in 9 runs (1 of 800, sent 50 ms before the kill); only
    # that, for a request sent just before the kill, is tolerated, and it is reported.
    cut = [
        o
        for o in run.failed()
        if "without sending complete message body" in o.error and killed_at - 0.5 <= o.sent_at <= killed_at
    ]
    if cut:
        _report(f"an answer under way when the replica died was cut short: {cut}")
    assert len(cut) <= 1 and len(run.failed()) == len(cut), run.failed()[:5]
    back = wait_for(lambda: ingress_replicas_up(SETTINGS.haproxy_stats_port) >= 2, 180, "the replica back in HAProxy")
    _report(f"Ray restarted it; HAProxy had two replicas UP again {back:.0f} s after the load ended")


def test_with_no_ingress_replica_the_endpoint_answers_503_with_retry_after(app, small_bundle):
    if app.topology != "colocated":
        pytest.skip("the colocated app's replicas are the drill's target")
    wait_for(lambda: ingress_replicas_up(SETTINGS.haproxy_stats_port) >= 2, 180, "two ingress replicas UP")
    users = _users(small_bundle)
    live = replicas("Ingress")
    began = time.monotonic()
    thread, run = open_loop(app.url, 10, 60, lambda i: {"user_id": users[i % len(users)], "k": 10})
    time.sleep(5)
    killed_at = time.monotonic() - began
    for r in live:
        os.kill(r["pid"], signal.SIGKILL)
    thread.join(120)
    after = [o for o in run.outcomes if o.sent_at >= killed_at]
    back = next((o.sent_at for o in after if o.status == 200 and o.sent_at > killed_at + 1), None)
    outage = [o for o in after if back is None or o.sent_at < back]
    counts = {
        "503 + Retry-After": sum(o.status == 503 and bool(o.retry_after) for o in outage),
        # Serve's proxy (HAProxy's backup) holds up to max_queued_requests callers for a replica, request_timeout_s
        # (2 s) at most, then answers 408.
        "408 from the proxy's queue": sum(o.status == 408 for o in outage),
    }
    # Requests in flight in the second of the kill may end as HAProxy's dropped connection or its 500 (its 502, 503
    # and 504 are rewritten to 500 by Ray's config) once every retry found a dead replica.
    in_flight = [o for o in outage if o.status in (0, 500) and killed_at - 0.5 <= o.sent_at <= killed_at + 1.0]
    # A request the proxy held until a replica came back may still be answered (200).
    other = [o for o in outage if o.status not in (200, 503, 408) and o not in in_flight]
    _report(
        f"every ingress replica killed at t={killed_at:.1f} s: {_summary(run)}; while none was up: {counts}, "
        f"{len(in_flight)} in flight at the kill lost; "
        f"answers again from t={back} s ({(back or float('nan')) - killed_at:.0f} s without a replica)"
    )
    assert back is not None, "no replica came back within the run"
    assert counts["503 + Retry-After"] > 0
    # Never a refused connection or a 5xx without Retry-After while the replicas are away.
    assert not other and all(o.retry_after for o in outage if o.status == 503), other[:5]


def test_killing_a_model_replica_costs_no_failure_and_no_late_answer(app, small_bundle):
    if app.topology != "distributed":
        pytest.skip("the colocated app has no model deployments")
    deadline_ms = 120  # deploy/serve_config.distributed.yaml's Ingress user_config
    live = replicas("CollaborativeFilter")
    assert live, "no CF replica found"
    users = _users(small_bundle)
    thread, run = open_loop(app.url, 20, 30, lambda i: {"user_id": users[i % len(users)], "k": 10})
    time.sleep(5)
    os.kill(live[0]["pid"], signal.SIGKILL)
    thread.join(90)
    degraded = sum(o.degraded for o in run.outcomes)
    late = sum(o.ms > deadline_ms / 2 for o in run.outcomes)
    _report(
        f"CF replica {live[0]['pid']} killed under 20 req/s: {_summary(run)} (the server's {run.server_p99_ms():.0f} "
        f"ms); {late} answers took over CF's share of the deadline ({deadline_ms / 2:.0f} ms)"
    )
    assert len(run.outcomes) == 600 and not run.failed(), run.failed()[:5]
    assert run.p99_ms() <= deadline_ms + 20
    assert degraded > 0  # the ladder answered without CF while Ray replaced it
