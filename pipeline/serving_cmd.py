"""`recserve serve`: a local Ray head when none runs (port 6380: Redis holds 6379), `serve run <config>`, wait
until the app answers, and on SIGTERM or Ctrl-C take down what it started."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType

from models.errors import ConfigError, RecserveError

RAY_PORT = int(os.environ.get("RECSERVE_RAY_PORT", "6380"))
RAY_TMP = os.environ.get("RECSERVE_RAY_TMP", "/tmp/recserve-ray")
METRICS_PORT = int(os.environ.get("RECSERVE_METRICS_PORT", "8080"))
BASE_ENV = {"OPENBLAS_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
# Set on the Ray processes: throughput-optimized Serve (direct ingress, user code on the replica's main loop,
# GC frozen), and a controller that polls less often (its idle CPU fell from ~45 to ~10 ms/s).
TUNED_ENV = {**BASE_ENV, "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def _bin(name: str) -> str:
    found = Path(sys.executable).parent / name
    return str(found) if found.exists() else (shutil.which(name) or name)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (urllib.error.URLError, OSError):
        return 0, ""


def direct_port(lo: int = 30000, hi: int = 30100) -> int | None:
    """The ingress replica's own HTTP port (RAY_SERVE_THROUGHPUT_OPTIMIZED's direct ingress): it skips the
    proxy's ~12 ms. A fresh cluster gives 30000; a redeploy moves it up while the old port is quarantined."""
    for port in range(lo, hi):
        if port_open(port) and http_get(f"http://127.0.0.1:{port}/healthz", 1.0)[0] == 200:
            return port
    return None


def start_ray(num_cpus: int | None, env: dict[str, str]) -> None:
    cmd = [
        _bin("ray"),
        "start",
        "--head",
        f"--port={RAY_PORT}",
        f"--temp-dir={RAY_TMP}",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--metrics-export-port={METRICS_PORT}",
    ]
    if num_cpus:
        cmd.append(f"--num-cpus={num_cpus}")
    out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RecserveError(f"`ray start` failed ({out.returncode}): {out.stderr.strip()[-800:]}")


def stop_ray() -> None:
    subprocess.run([_bin("ray"), "stop", "--force"], capture_output=True, timeout=120)


def serve(config: Path, http_port: int, timeout_s: float, num_cpus: int | None, tuned: bool = True) -> int:
    if not config.is_file():
        raise ConfigError(f"--config {config} does not exist: use deploy/serve_config.yaml or another serve config")
    env = TUNED_ENV if tuned else BASE_ENV
    address = os.environ.get("RAY_ADDRESS", f"127.0.0.1:{RAY_PORT}")
    host, _, port = address.rpartition(":")
    started_ray = False
    if not port_open(int(port), host or "127.0.0.1"):
        print(f"starting a local Ray head on port {RAY_PORT} (temp dir {RAY_TMP}, metrics on :{METRICS_PORT})")
        start_ray(num_cpus, env)
        started_ray = True
    began = time.monotonic()
    proc = subprocess.Popen(
        [_bin("serve"), "run", str(config), f"--address={address}"],
        env={**os.environ, **env, "RAY_ADDRESS": address},
        # A shell starts background jobs with SIGINT ignored; serve run must get Ctrl-C to shut the app down.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    stopping = {"flag": False}

    def stop(signum: int, frame: FrameType | None) -> None:
        stopping["flag"] = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        base = f"http://127.0.0.1:{http_port}"
        while not stopping["flag"]:
            if proc.poll() is not None:
                raise RecserveError(f"`serve run {config}` exited with {proc.returncode} before the app was ready")
            if http_get(f"{base}/healthz", 1.0)[0] == 200:
                break
            if time.monotonic() - began > timeout_s:
                raise RecserveError(f"the app was not up after {timeout_s:.0f} s: see the log above")
            time.sleep(0.5)
        if not stopping["flag"]:
            direct = direct_port() if tuned else None
            client = f"http://127.0.0.1:{direct}" if direct else base
            status, body = http_get(f"{client}/readyz", 60.0)  # the first readyz warms every path
            detail = json.loads(body) if body.startswith("{") else {}
            print(
                f"recserve is up in {time.monotonic() - began:.1f} s ({config.name}, bundle "
                f"{detail.get('model_version', '?')}, ready: {status == 200})\n"
                f"HTTP: {client} (direct ingress{'' if direct else ': not found'}), {base} (Serve proxy); "
                f"metrics: http://127.0.0.1:{METRICS_PORT}/metrics\n"
                f"try:  curl -s -X POST {client}/recommend -H 'Content-Type: application/json' "
                '-d \'{"user_id": "12347", "k": 5}\'',
                flush=True,
            )
        while not stopping["flag"] and proc.poll() is None:
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # serve run shuts the app down on Ctrl-C
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if started_ray:
            stop_ray()
        print("recserve stopped", flush=True)
    return 0
