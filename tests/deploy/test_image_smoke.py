"""The image and compose, started natively: no Docker engine runs here, so this starts the same processes with the
same files. The commands, environment, mounts and health check are read from the Dockerfile and compose.yaml:

- the package is built from the build context as .dockerignore leaves it and installed (not editable) into a
  folder of its own, which is all the served code comes from (the image's venv);
- redis-server with the compose service's persistence flags;
- compose's one-off `features` command (`recserve features materialize`) with its environment;
- the image's CMD (`recserve serve --config <the file the Dockerfile copies>`) with the image's ENV and the compose
  service's environment, its volumes' container paths mapped to test folders (the slice bundle for ./artifacts);
- the image's HEALTHCHECK command, then /readyz and a /recommend through HAProxy;
- Prometheus, when installed, with the file compose mounts for it, scraping the service.

What changes, and only that: every port (off the demo's and the other tests' ports), the service names to
127.0.0.1 and the container paths to folders of the test's own."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml

from pipeline.commands.serve import port_open
from settings import ServeSettings
from tests.conftest import ROOT
from tests.support.image import Stage, build_context, compose, image, mounts, rewrite
from tests.support.redis_server import OwnRedis

pytestmark = pytest.mark.integration

REDIS_PORT = 6398
HTTP_PORT = 8021
PROMETHEUS_PORT = 9093
# Every port and folder of this Ray, Serve and HAProxy: off the defaults (a running demo) and test_app_e2e.py's.
SETTINGS = ServeSettings(
    ray_port=6397,
    ray_tmp=Path(f"/tmp/recserve-ray-smoke-{os.getpid()}"),
    haproxy_dir=Path(f"/tmp/rs-hap-smk-{os.getpid()}"),
    metrics_port=8097,
    dashboard_port=8278,
    dashboard_agent_port=52378,
    client_server_port=10013,
    worker_ports="21002-21999",
    direct_ports="32000-32099",
    direct_grpc_ports="42000-42099",
    fallback_proxy_port=8513,
    fallback_grpc_port=9513,
    haproxy_stats_port=8416,
    haproxy_metrics_port=9113,
)
PORTS_ENV = {ServeSettings.env_name(k): str(v) for k, v in SETTINGS.model_dump().items()}


@dataclass(frozen=True)
class Stack:
    image: Stage
    env: dict[str, str]
    base: str
    tmp: Path


def install_package(tmp: Path) -> Path:
    """The project as the image installs it: built from the build context, non-editable, into `site`."""
    context = build_context(ROOT, tmp / "src")
    site = tmp / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation"]
    out = subprocess.run(
        [*pip, "--target", str(site), str(context)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return site


def container_env(final: Stage, service: dict, where: dict[str, Path], site: Path, home: Path) -> dict[str, str]:
    """The image's ENV, then the compose service's environment, as the container sees them, mapped to this host."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSERVE_") and k != "RAY_ADDRESS"}
    # The image's user starts with an empty home: no ~/.cache, no ~/.ray (Ray 2.60 turns token auth on for a head
    # when ~/.ray/auth_token exists, and a `serve run` beside it then fails to authenticate).
    env["HOME"] = str(home)
    # The image's PATH puts its venv first: here the installed package's scripts, then this venv's (ray, serve).
    env["PATH"] = os.pathsep.join([str(site / "bin"), str(Path(sys.executable).parent), os.environ["PATH"]])
    env["PYTHONPATH"] = str(site)
    given = {**{k: v for k, v in final.env.items() if k != "PATH"}, **(service.get("environment") or {})}
    for name, value in given.items():
        if value is None:  # passed through from the host's environment: the test sets none
            continue
        env[name] = rewrite(str(value), where)
    assert env["RECSERVE_REDIS"] == "redis:6379", "compose's recserve reaches the redis service"
    env["RECSERVE_REDIS"] = f"127.0.0.1:{REDIS_PORT}"
    return {**env, **PORTS_ENV}


def healthcheck(final: Stage) -> list[str]:
    """The image's HEALTHCHECK, run natively against this test's HTTP port."""
    argv = list(final.healthcheck)
    assert argv[0] == "python"
    script = argv[-1]
    assert script.count("127.0.0.1:8000/readyz") == 1, script
    return [sys.executable, *argv[1:-1], script.replace("127.0.0.1:8000/", f"127.0.0.1:{HTTP_PORT}/")]


def healthy(final: Stage, env: dict[str, str]) -> bool:
    return subprocess.run(healthcheck(final), env=env, capture_output=True, timeout=10).returncode == 0


@pytest.fixture(scope="module")
def stack(small_bundle, tmp_path_factory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("image-smoke")
    final, services = image(ROOT), compose(ROOT)["services"]
    site = install_package(tmp)
    # Container paths to host folders: the recserve service's volumes (./artifacts is the slice bundle's root).
    where = {}
    for m in mounts(services["recserve"]):
        where[m.target] = small_bundle.parent if m.source == "./artifacts" else tmp / "volumes" / m.source
    home = tmp / "home"  # the image's WORKDIR
    home.mkdir()
    env = container_env(final, services["recserve"], where, site, home)
    probe = subprocess.run(
        [sys.executable, "-c", "import pipeline, settings; print(pipeline.__file__, settings.__file__)"],
        env=env,
        cwd=home,
        capture_output=True,
        text=True,
    )
    assert probe.stdout.split() == [str(site / "pipeline" / "__init__.py"), str(site / "settings.py")], probe

    redis_cmd = services["redis"]["command"]
    assert redis_cmd[0] == "redis-server"
    redis = OwnRedis(REDIS_PORT, tmp / "redis", extra=tuple(redis_cmd[1:]))
    redis.start()
    # compose's `features`, before the service: the Feast registry on the volume, the bundle's rows in Redis.
    features = services["features"]
    assert features["volumes"] == services["recserve"]["volumes"]
    features_env = container_env(final, features, where, site, home)
    out = subprocess.run(
        [shutil.which(features["command"][0], path=features_env["PATH"]), *features["command"][1:]],
        cwd=home,
        env=features_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and "materialized bundle slice-v1" in out.stdout, out.stdout + out.stderr[-3000:]

    # The image's CMD, its config the file the Dockerfile copies there, with the HTTP port moved.
    cmd = list(final.cmd)
    config_at = cmd.index("--config") + 1
    config = yaml.safe_load((ROOT / final.copies[cmd[config_at]]).read_text())
    config["http_options"]["port"] = HTTP_PORT
    cmd[config_at] = str(tmp / "serve_config.yaml")
    Path(cmd[config_at]).write_text(yaml.safe_dump(config))
    cmd[0] = shutil.which(cmd[0], path=env["PATH"])
    assert cmd[0] == str(site / "bin" / "recserve")

    assert not healthy(final, env), "the health check passes with nothing serving"
    log_path = tmp / "serve.log"
    log = log_path.open("w")
    began = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        while "recserve is up" not in (text := log_path.read_text()):
            if proc.poll() is not None or time.monotonic() - began > 400:
                pytest.fail(f"recserve serve did not come up:\n{text[-4000:]}")
            time.sleep(1)
        print(f"recserve serve up in {time.monotonic() - began:.0f} s")
        yield Stack(final, env, f"http://127.0.0.1:{HTTP_PORT}", tmp)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(180) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
            redis.stop()
            for folder in (SETTINGS.ray_tmp, SETTINGS.haproxy_dir):  # outside tmp: Ray's socket paths are short
                shutil.rmtree(folder, ignore_errors=True)
            Path(f"{SETTINGS.ray_tmp}-head.log").unlink(missing_ok=True)
    assert "recserve stopped" in log_path.read_text()
    for port in (SETTINGS.ray_port, HTTP_PORT, SETTINGS.metrics_port, SETTINGS.haproxy_stats_port):
        assert not port_open(port), port


def test_the_health_check_passes_and_readyz_answers(stack):
    began = time.monotonic()
    # `recserve serve` says it is up once every replica is warm; readiness follows within a store check (0.5 s).
    while not healthy(stack.image, stack.env):
        assert time.monotonic() - began < 30, httpx.get(f"{stack.base}/readyz", timeout=10).text
        time.sleep(1)
    ready = httpx.get(f"{stack.base}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["model_version"] == "slice-v1" and body["feature_store"] == "ok"
    assert body["persistence"] == "aof(everysec)", "compose's Redis flags reach the service"
    # What the service wrote went to the volume the image declares for it, not into the installed package.
    assert any((stack.tmp / "volumes" / "recserve-data").rglob("registry.db"))


def test_recommend_answers(stack, small_bundle):
    user = pd.read_parquet(small_bundle / "user_features.parquet")["user_id"].iloc[3]
    r = httpx.post(f"{stack.base}/recommend", json={"user_id": user, "k": 5}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == "slice-v1" and len(body["items"]) == 5
    assert not body["degraded"], body["fallback_reason"]


def test_prometheus_scrapes_the_service(stack):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (Debian package `prometheus`): the scrape is not checked")
    service = compose(ROOT)["services"]["prometheus"]
    where = {m.target: stack.tmp / "prometheus" / m.source.replace("/", "_") for m in mounts(service)}
    config_mount = next(m for m in mounts(service) if m.target == "/etc/prometheus/prometheus.yml")
    config = yaml.safe_load((ROOT / config_mount.source).read_text())
    # Compose's service names become this host; the container's metrics port this test's.
    for job in config["scrape_configs"]:
        for group in job["static_configs"]:
            group["targets"] = [
                re.sub(r"^recserve:8080$", f"127.0.0.1:{SETTINGS.metrics_port}", t) for t in group["targets"]
            ]
    where[config_mount.target].parent.mkdir(parents=True, exist_ok=True)
    where[config_mount.target].write_text(yaml.safe_dump(config))
    flags = [f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}"]
    for flag in service["command"]:  # --config.file, --storage.tsdb.path: container paths, mapped
        name, _, value = flag.partition("=")
        flags.append(f"{name}={rewrite(value, where)}")
    for folder in where.values():
        folder.parent.mkdir(parents=True, exist_ok=True)
    log_path = stack.tmp / "prometheus.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([binary, *flags], stdout=log, stderr=subprocess.STDOUT)
    try:
        began, health = time.monotonic(), []
        while health != ["up"]:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() - began < 60, f"targets {health}: {log_path.read_text()[-2000:]}"
            time.sleep(1)
            try:
                url = f"http://127.0.0.1:{PROMETHEUS_PORT}/api/v1/targets"
                with urllib.request.urlopen(url, timeout=5) as r:
                    targets = json.load(r)["data"]["activeTargets"]
                health = [t["health"] for t in targets]
            except OSError:
                continue
        query = f"http://127.0.0.1:{PROMETHEUS_PORT}/api/v1/query?query=up"
        with urllib.request.urlopen(query, timeout=5) as r:
            result = json.load(r)["data"]["result"]
        assert [(s["metric"]["job"], s["value"][1]) for s in result] == [("recserve-ray", "1")]
    finally:
        proc.terminate()
        proc.wait(30)
