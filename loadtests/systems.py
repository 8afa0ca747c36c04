"""Start and stop the systems the load tests drive, and run one locust step against them. Shared by gate.py
(CI's SLO gate) and bench.py (the four-system benchmark). Imports no torch or Ray (serving_cmd is stdlib).

Three systems are `recserve serve` with a config, whose client URL is the `HTTP:` line it prints. The floor is a
pool of plain uvicorn processes behind HAProxy (loadtests/floor.py), as many as colocated has ingress replicas.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from loadtests.floor import Pool, ingress_replicas, running_pool
from pipeline.commands.keys import generate
from pipeline.commands.serve import port_open
from settings import PROJECT_ROOT, ServeSettings, process_env

ROOT = PROJECT_ROOT
BIN = Path(sys.executable).parent
SERVE_PORT = 8000  # the configs' http_options.port: Serve's HAProxy (or proxy) holds it until the system is down
FLOOR = Pool(workers=ingress_replicas())
# This run's API key, made per process and never written to disk: every system started here accepts it
# (RECSERVE_API_KEYS, beside any keys file the machine has), and locust sends it on POST /events (RECSERVE_API_KEY).
RUN_KEY, RUN_KEY_ENTRY = generate("loadtest", ("events:write",))


def key_env() -> dict[str, str]:
    """The environment that gives a server the run's key (RECSERVE_API_KEYS) and a client the key itself."""
    return {"RECSERVE_API_KEYS": RUN_KEY_ENTRY, "RECSERVE_API_KEY": RUN_KEY}


@dataclass(frozen=True)
class System:
    name: str
    label: str
    command: list[str]  # `recserve serve …`; empty for the floor, which is FLOOR's pool
    ray: bool  # its metrics are on Ray's metrics port

    @property
    def ports(self) -> list[int]:
        """What it listens on: free before it starts, and waited for after it stops."""
        return [ServeSettings().ray_port, SERVE_PORT] if self.ray else [FLOOR.port, *FLOOR.worker_ports]


SYSTEMS = {
    "colocated": System("colocated", "recserve colocated", [str(BIN / "recserve"), "serve"], True),
    "distributed": System(
        "distributed",
        "recserve distributed",
        [str(BIN / "recserve"), "serve", "--config", str(ROOT / "deploy" / "serve_config.distributed.yaml")],
        True,
    ),
    "naive": System(
        "naive",
        "naive Ray Serve",
        [
            str(BIN / "recserve"),
            "serve",
            "--ray-defaults",
            "--config",
            str(ROOT / "loadtests" / "naive_serve_config.yaml"),
        ],
        True,
    ),
    "floor": System(
        "floor",
        f"in-process floor ({FLOOR.workers}x uvicorn behind HAProxy, no Ray)",
        [],
        False,
    ),
}


@contextmanager
def running(system: System, log_path: Path, timeout_s: float = 300) -> Iterator[str]:
    """Start the system, yield its base URL once it is up and warm, and stop it (and the Ray it started)."""
    taken = [port for port in system.ports if port_open(port)]
    if taken:
        raise RuntimeError(f"port(s) {taken} are taken: stop the recserve, Ray or floor that holds them")
    env = {**os.environ, **process_env(), **key_env(), "PYTHONUNBUFFERED": "1"}
    if not system.ray:
        try:
            with running_pool(FLOOR, log_path, env, timeout_s) as url:
                yield url
        finally:
            _wait_closed(system.ports)
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            system.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        url = _wait_up(system, proc, log_path, timeout_s)
        yield url
    finally:
        _stop(proc)
        _wait_closed(system.ports)


def _wait_up(system: System, proc: subprocess.Popen, log_path: Path, timeout_s: float) -> str:
    """The client URL `recserve serve` prints once the app is up and has warmed every path."""
    began = time.monotonic()
    while time.monotonic() - began < timeout_s:
        if proc.poll() is not None:
            tail = log_path.read_text()[-2000:]
            raise RuntimeError(f"{system.label} exited with {proc.returncode} before it was up:\n{tail}")
        found = re.search(r"^HTTP: (http://\S+)", log_path.read_text(), re.M)
        if found:
            return found.group(1)
        time.sleep(0.5)
    raise RuntimeError(f"{system.label} was not up after {timeout_s:.0f} s: see {log_path}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # recserve serve shuts the app down and stops the Ray it started
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_closed(ports: list[int], timeout_s: float = 60) -> None:
    """Up to `timeout_s` for the ports to close: the next system needs them (the next start says if one stays)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(port_open(p) for p in ports):
        time.sleep(1)


@dataclass(frozen=True)
class Step:
    rate: float
    requests: int
    failures: int
    p50: float
    p95: float
    p99: float
    rps: float
    degraded: float
    shed: int
    answered_p99: float
    late: int  # sends held back more than 10 ms past their due time by the user's request in flight
    passed: bool
    line: str
    locust_cpu_s: float
    wall_s: float


SUMMARY = re.compile(
    r"SLO gate (?P<verdict>PASS|FAIL): requests (?P<requests>\d+), failures (?P<failures>\d+), "
    r"p50 (?P<p50>[\d.]+) ms, p95 (?P<p95>[\d.]+) ms, p99 (?P<p99>[\d.]+) ms, rps (?P<rps>[\d.]+), "
    r"degraded (?P<degraded>[\d.]+), shed (?P<shed>\d+), answered p99 (?P<answered_p99>[\d.]+) ms"
    r"(?:, late (?P<late>\d+), arrival (?P<arrival>[\w-]+))?"
)


def locust_step(
    url: str,
    rate: float,
    seconds: float,
    report: Path,
    *extra: str,
    rate_per_user: float = 2.0,
    arrival: str = "steady",
) -> Step:
    """Offer `rate` requests a second (the base rate: poisson-bursty's mean is 1.2x it) for `seconds`, open loop,
    with arrivals `arrival` (loadtests/arrivals.py) and the SLO gate; CSV and HTML to `report`."""
    users = max(1, round(rate / rate_per_user))
    report.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(BIN / "locust"),
        "-f",
        str(ROOT / "loadtests" / "locustfile.py"),
        "--headless",
        "--only-summary",
        "--host",
        url,
        "-u",
        str(users),
        "-r",
        str(users),
        "--run-time",
        f"{seconds:.0f}s",
        "--rate-per-user",
        f"{rate / users:g}",
        "--arrival",
        arrival,
        "--csv",
        str(report),
        "--html",
        f"{report}.html",
        *extra,
    ]
    before = os.times()
    began = time.monotonic()
    out = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 120, env={**os.environ, **key_env()}
    )
    wall = time.monotonic() - began
    after = os.times()
    found = SUMMARY.search(out.stdout + out.stderr)
    if not found:
        raise RuntimeError(f"locust printed no summary line (exit {out.returncode}):\n{out.stderr[-3000:]}")
    g = found.groupdict()
    return Step(
        rate=rate,
        requests=int(g["requests"]),
        failures=int(g["failures"]),
        p50=float(g["p50"]),
        p95=float(g["p95"]),
        p99=float(g["p99"]),
        rps=float(g["rps"]),
        degraded=float(g["degraded"]),
        shed=int(g["shed"]),
        answered_p99=float(g["answered_p99"]),
        late=int(g["late"] or 0),
        passed=g["verdict"] == "PASS" and out.returncode == 0,
        line=found.group(0),
        locust_cpu_s=(after.children_user + after.children_system) - (before.children_user + before.children_system),
        wall_s=wall,
    )
