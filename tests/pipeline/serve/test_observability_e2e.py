"""Prometheus and the dashboard against the running app: `recserve serve` (colocated, its own ports and temp dir)
over the session's Feast project, and a real Prometheus (Debian's package) started with deploy/prometheus.yml and
its alert rules, its target rewritten to this app's metrics port.

One minute of open-loop load at the stable endpoint (HAProxy); then PromQL's histogram_quantile over
recserve_request_latency_ms must agree with the p99 the load generator measured, within the bucket resolution.
Then the conditions some panels show come about for real: add_to_cart events convert shown items, a canary whose
blender fails is rolled back by the guard, a burst past max_in_flight is shed with 503. After that every query of
every panel of deploy/grafana/dashboards/recserve.json, its variables filled in from Prometheus, must return data;
only the panels in tests/support/dashboard.py's EXPECTED_EMPTY may not (none now: the drift panel must show data).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml

from chain.rollout import ArmSpec, Guard, RolloutSpec
from pipeline.commands.serve import http_get
from pipeline.serve.metrics import REQUEST_LATENCY_MS
from settings import ServeSettings
from tests.conftest import ROOT
from tests.support import dashboard
from tests.support.app import serve_config, serving, settings_env
from tests.support.keys import bearer, new_key
from tests.support.load import open_loop
from tests.support.prometheus import Prometheus, binary, running

pytestmark = pytest.mark.integration

HTTP_PORT = 8462
# Off the demo's defaults and the other e2e tests' ports, so none of them meet.
SETTINGS = ServeSettings(
    ray_port=6462,
    ray_tmp=Path(f"/tmp/recserve-ray-obs-{os.getpid()}"),
    haproxy_dir=Path(f"/tmp/rs-hap-obs-{os.getpid()}"),
    metrics_port=8463,
    dashboard_port=8464,
    dashboard_agent_port=52462,
    client_server_port=10462,
    worker_ports="23000-23499",
    direct_ports="33500-33599",
    direct_grpc_ports="43500-43599",
    fallback_proxy_port=8465,
    fallback_grpc_port=9465,
    haproxy_stats_port=8466,
    haproxy_metrics_port=9466,
)
KEY, KEY_ENTRY = new_key("obs", "admin")
ENV = {
    **settings_env(SETTINGS),
    "RECSERVE_API_KEYS": KEY_ENTRY,
    "RECSERVE_API_KEYS_FILE": f"/tmp/recserve-obs-no-keys-file-{os.getpid()}",
    "RECSERVE_API_KEY": KEY,
}
MAX_IN_FLIGHT = 8  # per replica: the steady load stays far below; the burst below goes past it
RATE, SECONDS = 20, 60
LATENCY = 'ray_recserve_request_latency_ms_bucket{route="/recommend"}'


def report(line: str) -> None:
    """Print a figure and keep it in reports/drills.log (pytest shows no output of a passing test)."""
    print(line)
    path = ROOT / "reports" / "drills.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        out.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")


def wait_for(predicate, timeout_s: float, what: str) -> float:
    began = time.monotonic()
    while not predicate():
        assert time.monotonic() - began < timeout_s, f"{what} not within {timeout_s:.0f} s"
        time.sleep(1)
    return time.monotonic() - began


@pytest.fixture(scope="module")
def app(small_bundle, slice_online, store_settings, tmp_path_factory):
    binary("prometheus")  # before minutes of start-up: skip (or fail in CI) at once without it
    config = serve_config("serve_config.yaml", HTTP_PORT, small_bundle, store_settings)
    config["applications"][0]["deployments"][0]["user_config"]["max_in_flight"] = MAX_IN_FLIGHT
    with serving(config, tmp_path_factory.mktemp("serve-obs"), ENV) as served:
        report(f"observability e2e: recserve serve up in {served.up_s:.0f} s")
        yield served.url
    assert served.proc.returncode == 0


@pytest.fixture(scope="module")
def prometheus(app, tmp_path_factory):
    """deploy/prometheus.yml as shipped, but for its target: this app's metrics port."""
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    job["static_configs"][0]["targets"] = [f"127.0.0.1:{SETTINGS.metrics_port}"]
    files = {name: ROOT / "deploy" / name for name in config["rule_files"]}
    with running(config, tmp_path_factory.mktemp("prometheus"), files) as prom:
        yield prom


def scraped_count(prom: Prometheus) -> float:
    found = prom.query('sum(ray_recserve_request_latency_ms_count{route="/recommend"})')
    return float(found[0]["value"][1]) if found else 0.0


def bucket_width(ms: float) -> float:
    """The width of the REQUEST_LATENCY_MS bucket that holds `ms` (the last finite one past its bound)."""
    bounds = [0.0, *REQUEST_LATENCY_MS]
    for lo, hi in itertools.pairwise(bounds):
        if ms <= hi:
            return hi - lo
    return bounds[-1] - bounds[-2]


def users(bundle: Path) -> list[str]:
    known = pd.read_parquet(bundle / "user_features.parquet")["user_id"].head(200).tolist()
    return [*known, *(f"obs-new-{n}" for n in range(20))]


def test_targets_up_and_promql_p99_agrees_with_the_load_generator(app, prometheus, small_bundle):
    wait_for(lambda: prometheus.targets() and prometheus.targets()[0]["health"] != "unknown", 60, "a first scrape")
    targets = prometheus.targets()
    assert targets and all(t["health"] == "up" for t in targets), targets
    # Every rule evaluates against the live series without error.
    rules = prometheus.rules()
    wait_for(lambda: all(r.get("lastEvaluation", "").startswith("2") for r in prometheus.rules()), 60, "rules run")
    shipped = yaml.safe_load((ROOT / "deploy" / "alerts.yml").read_text())["groups"][0]["rules"]
    assert len(rules) == len(shipped) and all(r["health"] == "ok" for r in prometheus.rules()), prometheus.rules()

    client = httpx.Client(base_url=app, timeout=30)
    ids = users(small_bundle)
    for u in ids[:10]:  # the series exist before the measured run starts, so it can be subtracted out
        assert client.post("/recommend", json={"user_id": u, "k": 10}).status_code == 200
    wait_for(lambda: scraped_count(prometheus) == 10, 90, "the warm-up scraped")
    t0 = time.time()

    began = time.monotonic()
    # aiohttp: the lighter client, so the load generator's figure holds little of its own time (tests/support/load.py).
    body = lambda i: {"user_id": ids[i % len(ids)], "k": 10}  # noqa: E731
    thread, run = open_loop(app, RATE, SECONDS, body, client="aiohttp")
    thread.join(SECONDS + 60)
    answered = [o for o in run.outcomes if o.status]
    assert len(run.outcomes) == RATE * SECONDS and not run.failed(), run.failed()[:5]
    took = wait_for(lambda: scraped_count(prometheus) >= 10 + len(answered), 90, "the run scraped")
    t1 = time.time()
    assert scraped_count(prometheus) == 10 + len(answered)

    # The run alone: every bucket now, less the same bucket at t0 (the @ modifier), summed over the replicas.
    expr = f"histogram_quantile(0.99, sum by (le) ({LATENCY}) - sum by (le) ({LATENCY} @ {t0:.3f}))"
    (sample,) = prometheus.query(expr, at=t1)
    promql_p99, client_p99, ingress_p99 = float(sample["value"][1]), run.p99_ms(), run.server_p99_ms()
    width = bucket_width(max(promql_p99, ingress_p99, client_p99))
    report(
        f"observability e2e: {len(run.outcomes)} requests at {RATE}/s for {SECONDS} s: PromQL histogram_quantile "
        f"p99 {promql_p99:.1f} ms; the load generator's p99 {client_p99:.1f} ms as it waited (aiohttp), "
        f"{ingress_p99:.1f} ms by the server's clock from HAProxy's stamp (Server-Timing); bucket width "
        f"{width:.0f} ms; scraped {took:.0f} s after the run; "
        f"{time.monotonic() - began:.0f} s in all"
    )
    # The histogram of the same requests on the same clock, through Ray's agent, the scrape and histogram_quantile:
    # within one bucket of what the load generator was told of each request.
    assert abs(promql_p99 - ingress_p99) <= width, (promql_p99, ingress_p99, width)
    # The bar: within the bucket resolution of the p99 the load generator measured. The server's clock
    # starts at HAProxy's X-Request-Start stamp (pipeline/edge/timing.py), so what the client waits beyond it is
    # the loopback hops and the client itself.
    assert abs(client_p99 - promql_p99) <= width, (client_p99, promql_p99, width)


def converts(client: httpx.Client, ids: list[str]) -> int:
    """Answers shown, then an add_to_cart of each answer's first item: real conversions of the champion's arm."""
    shown = {}
    for u in ids:
        r = client.post("/recommend", json={"user_id": u, "k": 5})
        assert r.status_code == 200, r.text
        shown[u] = r.json()["items"][0]["item_id"]
    time.sleep(1.0)  # exposures are flushed to Redis every 0.15 s
    events = [{"user_id": u, "item_id": i, "event_type": "add_to_cart"} for u, i in shown.items()]
    r = client.post("/events", json={"events": events})
    assert r.status_code == 202, r.text
    return r.json()["accepted"]


def roll_back_a_failing_canary(url: str, client: httpx.Client, bundle: Path, ids: list[str]) -> float:
    """A canary (the same bundle) whose blender fails on purpose: the guard rolls it back on its own."""
    from pipeline.commands.rollout import deploy

    spec = RolloutSpec(
        salt=f"obs-{time.time_ns()}",
        arms=(
            ArmSpec(name="champion", bundle=str(bundle), weight=50, role="champion"),
            ArmSpec(
                name="canary",
                bundle=str(bundle),
                weight=50,
                role="canary",
                knobs={"chaos": {"stage": "blend", "mode": "error"}},
            ),
        ),
        guard=Guard(window_s=10, min_answers=20),
    )
    deploy(spec, url, 300.0, SETTINGS)
    began = time.monotonic()

    def rolled_back() -> bool:
        for u in ids[:40]:
            client.post("/recommend", json={"user_id": u, "k": 3})
        arms = [json.loads(http_get(f"{url}/readyz", 5.0)[1])["arms"]["canary"] for _ in range(4)]
        return all(a["rolled_back"] for a in arms)

    wait_for(rolled_back, 90, "the failing canary rolled back")
    return time.monotonic() - began


def burst(url: str, n: int) -> dict[int, int]:
    """`n` requests at once: past max_in_flight per replica, the edge sheds with 503."""

    async def go() -> list[int]:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as c:
            answers = await asyncio.gather(
                *(c.post("/recommend", json={"user_id": f"burst-{i}", "k": 10}) for i in range(n)),
                return_exceptions=True,
            )
        return [a.status_code if isinstance(a, httpx.Response) else 0 for a in answers]

    codes: dict[int, int] = {}
    for code in asyncio.run(go()):
        codes[code] = codes.get(code, 0) + 1
    return codes


def test_every_panel_shows_data(app, prometheus, small_bundle):
    began = time.monotonic()
    client = httpx.Client(base_url=app, timeout=30, headers=bearer(KEY))
    ids = users(small_bundle)
    thread, _ = open_loop(app, 10, 60, lambda i: {"user_id": ids[i % len(ids)], "k": 10})
    accepted = converts(client, ids[:20])
    rolled = roll_back_a_failing_canary(app, client, small_bundle, ids)
    codes = burst(app, 200)
    thread.join(120)
    assert codes.get(503, 0) > 0 and set(codes) <= {200, 503}, codes
    report(
        f"observability e2e: {accepted} add_to_cart events; failing canary rolled back {rolled:.0f} s after its "
        f"deploy; a burst of 200 at max_in_flight {MAX_IN_FLIGHT}/replica: {codes}"
    )

    board = dashboard.load()

    def lookup(metric: str, label: str) -> list[str]:
        found = prometheus.http.get(f"/api/v1/label/{label}/values", params={"match[]": metric}).json()
        return found["data"]

    values = {name: dashboard.label_values(q, lookup) for name, q in dashboard.query_variables(board).items()}
    assert "/recommend" in values["route"] and {"champion", "canary"} <= set(values["arm"]), values
    targets = dashboard.targets(board)

    def empty() -> list[str]:
        return [
            f"{t.panel} [{t.ref}]: {dashboard.fill(t.expr, values)}"
            for t in targets
            if t.panel not in dashboard.EXPECTED_EMPTY and not prometheus.query(dashboard.fill(t.expr, values))
        ]

    # Ray's agent exports on its own schedule, Prometheus scrapes every 10 s: the last condition shows within 60 s.
    deadline = time.monotonic() + 60
    while (missing := empty()) and time.monotonic() < deadline:
        time.sleep(5)
    assert not missing, "panels that show nothing:\n" + "\n".join(missing)
    panels = len(board.panels)
    report(
        f"observability e2e: {panels} panels, {len(targets)} queries; every one returns data "
        f"(allowed empty: {dashboard.EXPECTED_EMPTY or 'none'}); {time.monotonic() - began:.0f} s"
    )
