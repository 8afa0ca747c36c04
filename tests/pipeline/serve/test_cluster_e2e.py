"""End to end on a Ray cluster of two nodes on this machine: a head that hosts the ingress and the endpoint, and a
worker node (its own temp dir, ports and node label) that hosts the model deployments, joined with
`ray start --address`. The bundle is given only as an s3:// URI (a real S3 API server, moto's) and the Feast
registry lives in S3 too; each node fetches and verifies the bundle into a cache of its own.

Checked: where Ray placed each deployment (its GCS tables), answers through the stable endpoint, degraded (never
failed) answers while the worker node is gone, and recovery once a worker node joins again."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import httpx
import pandas as pd
import pytest

from models.bundle import verified
from models.remote import publish
from pipeline.commands.serve import RayHead, port_open, ray_env
from pipeline.featurestore.store import drop_project, open_store
from settings import ServeSettings, StoreSettings
from tests.conftest import ROOT, recserve
from tests.support.app import serve_config, serving, settings_env
from tests.support.load import open_loop
from tests.support.ray_cluster import WorkerNode

pytestmark = pytest.mark.integration

POOL = "recserve.io/pool"
HTTP_PORT = 8021
PID = os.getpid()
# The head's ports and folders: off the defaults and off every other test's (test_app_e2e uses 6391, 8011, ...).
SETTINGS = ServeSettings(
    ray_port=6393,
    ray_tmp=Path(f"/tmp/rs-cl-head-{PID}"),
    haproxy_dir=Path(f"/tmp/rs-cl-hap-{PID}"),
    metrics_port=8093,
    dashboard_port=8278,
    dashboard_agent_port=52378,
    client_server_port=10013,
    worker_ports="22000-22399",
    direct_ports="32000-32099",
    direct_grpc_ports="42000-42099",
    fallback_proxy_port=8521,
    fallback_grpc_port=9521,
    haproxy_stats_port=8424,
    haproxy_metrics_port=9121,
)


def _worker_ports(base: int) -> dict[str, int]:
    names = ("node_manager", "object_manager", "metrics", "agent_listen", "agent_grpc", "runtime_env_agent")
    return {name: base + i for i, name in enumerate(names)}


def _placement(auth: dict[str, str]) -> dict[str, set[str]]:
    """Each deployment's live replicas' node pools, from Ray's GCS (a driver in a subprocess)."""
    out = subprocess.run(
        [sys.executable, "-m", "tests.support.ray_cluster", f"--address=127.0.0.1:{SETTINGS.ray_port}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **auth},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    pools: dict[str, set[str]] = {}
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            pools.setdefault(row["deployment"], set()).add(row["labels"].get(POOL, "?"))
    return pools


def _until_whole(client: httpx.Client, user: str, timeout_s: float) -> float:
    """Seconds until an answer comes whole (not degraded); every answer meanwhile must be a 200."""
    began = time.monotonic()
    while True:
        r = client.post("/recommend", json={"user_id": user, "k": 10})
        assert r.status_code == 200, r.text[:300]
        if not r.json()["degraded"]:
            return time.monotonic() - began
        assert time.monotonic() - began < timeout_s, (
            f"still degraded after {timeout_s:.0f} s: {r.json()['fallback_reason']}"
        )
        time.sleep(1)


def _report(line: str) -> None:
    path = ROOT / "reports" / "cluster-drill.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        out.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")


def test_two_nodes_bundle_from_s3_worker_loss_degrades_then_recovers(small_bundle, s3, s3_env, tmp_path):
    uri = publish(small_bundle, f"{s3.bucket('bundles')}/cluster-{uuid.uuid4().hex[:8]}")
    project = f"cl_{uuid.uuid4().hex[:10]}"
    registry = uri.replace("/slice-v1/", "/feast/registry.db")
    store = StoreSettings(project=project, registry=registry, event_log_dir=tmp_path / "event_log")
    # Ray's token authentication with a token of the test's own, given to every node and driver (a real cluster
    # gives each node the same token too); ~/.ray/auth_token is never read or written.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    common = {**s3_env, "RECSERVE_FEAST_PROJECT": project, "RECSERVE_FEAST_REGISTRY": registry}
    out = recserve(
        "features", "materialize", "--bundle", uri, env={**common, "RECSERVE_BUNDLE_CACHE": str(tmp_path / "cli")}
    )
    assert out.returncode == 0, out.stderr

    base_env = {**ray_env(SETTINGS), **common, **auth}
    caches = {name: tmp_path / f"cache-{name}" for name in ("head", "worker", "worker2", "driver")}
    head = RayHead(
        SETTINGS,
        {**base_env, "RECSERVE_BUNDLE_CACHE": str(caches["head"])},
        2,
        SETTINGS.ray_tmp.parent / f"{SETTINGS.ray_tmp.name}.log",
        labels={POOL: "head"},
    )
    address = f"127.0.0.1:{SETTINGS.ray_port}"
    workers: list[WorkerNode] = []
    stack = ExitStack()

    def worker(name: str, ports: int, worker_ports: str) -> WorkerNode:
        node = WorkerNode(
            address=address,
            tmp=Path(f"/tmp/rs-cl-{name}-{PID}"),
            labels={POOL: "cpu"},
            env={**base_env, "RECSERVE_BUNDLE_CACHE": str(caches[name])},
            ports=_worker_ports(ports),
            worker_ports=worker_ports,
        )
        workers.append(node)
        node.start()
        return node

    try:
        head.wait_up()
        first = worker("worker", 23500, "23600-23899")

        # The bundle only as its URI: no node has the bundle's folder.
        config = serve_config("serve_config.cluster.yaml", HTTP_PORT, uri, store)
        env = {**settings_env(SETTINGS), **common, **auth, "RAY_ADDRESS": address}
        env["RECSERVE_BUNDLE_CACHE"] = str(caches["driver"])
        served = stack.enter_context(serving(config, tmp_path, env, timeout_s=480))
        url = served.url
        _report(f"two-node app up in {served.up_s:.0f} s, bundle {uri}")

        # Where Ray put each deployment: the ingress on the head, every model on the worker node.
        pools = _placement(auth)
        assert pools == {
            "Ingress": {"head"},
            "CollaborativeFilter": {"cpu"},
            "ContentModel": {"cpu"},
            "Blender": {"cpu"},
        }
        # Each node fetched the bundle from S3 into its own cache, whole and verified.
        for name in ("head", "worker"):
            fetched = [p for p in caches[name].iterdir() if p.is_dir() and not p.name.startswith(".")]
            assert [p.name.split("-")[0] for p in fetched] == ["slice"], (name, fetched)
            verified(fetched[0])

        users = pd.read_parquet(small_bundle / "user_features.parquet")["user_id"].astype(str).tolist()[:50]
        with httpx.Client(base_url=url, timeout=30) as client:
            # Whole answers through the endpoint (the first calls across nodes may miss the deadline while cold).
            warm = _until_whole(client, users[0], 120)
            whole = [client.post("/recommend", json={"user_id": u, "k": 10}) for u in users[:20]]
            assert all(r.status_code == 200 for r in whole)
            reasons = [r.json()["fallback_reason"] for r in whole if r.json()["degraded"]]
            _report(f"whole answers {warm:.0f} s after start; then {20 - len(reasons)} of 20 whole ({reasons})")
            assert len(reasons) <= 2, reasons

            # The worker node goes away under load: every answer still comes, degraded, none failed.
            thread, run = open_loop(url, 10, 40, lambda i: {"user_id": users[i % len(users)], "k": 10})
            time.sleep(5)
            stopped_at = time.monotonic()
            first.stop()
            thread.join(120)
            failed = run.failed()
            degraded = sum(o.degraded for o in run.outcomes)
            _report(
                f"worker node stopped under 10 req/s: {len(run.outcomes)} requests, {len(failed)} failed, "
                f"{degraded} degraded, p99 {run.p99_ms():.0f} ms"
            )
            assert len(run.outcomes) == 400 and not failed, failed[:5]
            assert degraded > 0
            assert run.outcomes[-1].degraded  # still without models: nowhere else may host them
            assert _placement(auth).get("CollaborativeFilter") in (None, set())

            # A worker node joins again: Serve places the model replicas there, answers are whole again.
            worker("worker2", 24500, "24600-24899")
            back = _until_whole(client, users[0], 300)
            _report(
                f"worker node rejoined: whole answers {back:.0f} s after `ray start`, "
                f"{time.monotonic() - stopped_at:.0f} s after the first node stopped"
            )
            assert _placement(auth)["CollaborativeFilter"] == {"cpu"}
    finally:
        stack.close()  # recserve serve's own shutdown (SIGTERM) of the app; the cluster stays ours to stop
        for node in workers:
            node.stop()
        head.stop()
        drop_project(open_store(store), store)
    assert "recserve stopped" in served.log.read_text()
    for port in (SETTINGS.ray_port, HTTP_PORT, SETTINGS.haproxy_stats_port, 23500, 24500):
        assert not port_open(port), port
