"""What tracing costs a request: the colocated app (deploy/serve_config.yaml) with tracing off, then at 100%
sampling (the file exporter, batching), under the same open-loop bursty load, each arm run `--runs` times,
interleaved (off, on, off, on, ...), each run on a fresh `recserve serve`.

    python loadtests/trace_cost.py [--rate 100] [--seconds 60] [--runs 2] [--bundle DIR] [--out reports/trace-cost]

Load: Poisson arrivals at twice the base rate for 2 s in every 10 (loadtests/arrivals.py, the lifecycle issue's
"2x bursts"), POST /recommend for the bundle's holdout users with 10% new ones (loadtests/rollout_drill.py's
driver). Latency is the client's (ms, send to last byte); the first 10 s of each run are warm-up and left out.
The store is a scratch Feast project on RECSERVE_REDIS, materialized from the bundle and dropped at the end; Ray,
Serve and HAProxy use ports of their own (below), off the defaults and the tests'. Prints one line per run and a
summary, and writes them to <out>/runs.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests.rollout_drill import Load, drive
from loadtests.traffic import load
from models.bundle import read_manifest
from pipeline.featurestore.store import drop_project, materialize, open_store
from pipeline.serve.tracing import read_spans
from settings import ServeSettings, Settings, StoreSettings

ROOT = Path(__file__).resolve().parents[1]
HTTP_PORT = 8491
SETTINGS = ServeSettings(
    ray_port=6491,
    ray_tmp=Path(f"/tmp/recserve-ray-tcost-{os.getpid()}"),
    haproxy_dir=Path(f"/tmp/rs-hap-tc-{os.getpid()}"),
    metrics_port=8492,
    dashboard_port=8493,
    dashboard_agent_port=52491,
    client_server_port=10491,
    worker_ports="26000-26499",
    direct_ports="35500-35599",
    direct_grpc_ports="45500-45599",
    fallback_proxy_port=8494,
    fallback_grpc_port=9494,
    haproxy_stats_port=8495,
    haproxy_metrics_port=9495,
)
WARMUP_S = 10.0


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of `values` by the nearest-rank rule; nan for none."""
    ms = sorted(values)
    return ms[min(len(ms) - 1, int(q * len(ms)))] if ms else float("nan")


def start(config: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """`recserve serve --config` until it says it is up (at most 400 s)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.commands.cli", "serve", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    began = time.monotonic()
    while "recserve is up" not in log.read_text():
        if proc.poll() is not None or time.monotonic() - began > 400:
            proc.kill()
            raise SystemExit(f"recserve serve did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    return proc


def one_run(
    arm: str, bundle: Path, store: StoreSettings, rate: float, seconds: float, users: list[str], tmp: Path
) -> dict:
    """One fresh app for `arm` ("off" or "on"), `seconds` of bursty load at base `rate` (req/s); its figures."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{arm}-", dir=tmp))
    config = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    config["http_options"]["port"] = HTTP_PORT
    if arm == "on":
        config["tracing_config"] = {
            "enabled": True,
            "exporter_import_path": "pipeline.serve.tracing:file_exporter",
            "sampling_ratio": 1.0,
        }
    else:
        config["tracing_config"] = {"enabled": False}
    config["applications"][0]["args"]["bundle"] = str(bundle)
    config["applications"][0]["args"]["store"] = {
        "redis": store.redis,
        "project": store.project,
        "registry": str(store.registry),
        "event_log_dir": str(store.event_log_dir),
    }
    path = run_dir / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        **{f"RECSERVE_{k.upper()}": str(v) for k, v in SETTINGS.model_dump().items()},
        "RECSERVE_TRACE_DIR": str(run_dir / "spans"),
    }
    env.pop("RAY_ADDRESS", None)
    proc = start(path, env, run_dir / "serve.log")
    try:
        out = Load()
        began = time.monotonic()
        thread = drive(f"http://127.0.0.1:{HTTP_PORT}", rate, users, out, seed=int(time.time()))
        time.sleep(seconds)
        out.stop.set()
        thread.join(60)
        kept = [a for a in out.answers if a.sent - began >= WARMUP_S]
        ok = [a.ms for a in kept if a.status == 200]
        spans = read_spans(run_dir / "spans") if (run_dir / "spans").exists() else []
        return {
            "arm": arm,
            "rate": rate,
            "seconds": seconds,
            "sent": len(kept),
            "answered": len(ok),
            "failed": len(kept) - len(ok),
            "degraded": sum(a.degraded for a in kept),
            "p50_ms": round(pct(ok, 0.5), 2),
            "p99_ms": round(pct(ok, 0.99), 2),
            "mean_ms": round(statistics.fmean(ok), 2) if ok else float("nan"),
            "traces": len({s["trace_id"] for s in spans if s["name"] == "recommend"}),
            "spans": len(spans),
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(180)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=100.0, help="base rate, req/s (bursts at twice this)")
    parser.add_argument("--seconds", type=float, default=60.0, help="load per run, s (the first 10 s are warm-up)")
    parser.add_argument("--runs", type=int, default=2, help="runs per arm, interleaved")
    parser.add_argument("--bundle", type=Path, help="default: the one RECSERVE_ARTIFACTS/LATEST names")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "trace-cost")
    args = parser.parse_args()
    bundle = (args.bundle or Settings().latest_bundle()).resolve()
    users = load(bundle).users
    tmp = Path(tempfile.mkdtemp(prefix="trace-cost-"))
    store = StoreSettings(
        project=f"tracecost_{uuid.uuid4().hex[:10]}", registry=tmp / "registry.db", event_log_dir=tmp / "event_log"
    )
    feast = open_store(store)
    materialize(feast, store, bundle, read_manifest(bundle))
    runs = []
    try:
        for i in range(args.runs):
            for arm in ("off", "on"):
                r = one_run(arm, bundle, store, args.rate, args.seconds, users, tmp)
                r["run"] = i + 1
                runs.append(r)
                print(json.dumps(r), flush=True)
    finally:
        drop_project(feast, store)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runs.json").write_text(json.dumps(runs, indent=1))
    for arm in ("off", "on"):
        mine = [r for r in runs if r["arm"] == arm]
        print(
            f"{arm:>3}: p50 {', '.join(str(r['p50_ms']) for r in mine)} ms; "
            f"p99 {', '.join(str(r['p99_ms']) for r in mine)} ms"
        )
    p50 = {arm: statistics.median(r["p50_ms"] for r in runs if r["arm"] == arm) for arm in ("off", "on")}
    p99 = {arm: statistics.median(r["p99_ms"] for r in runs if r["arm"] == arm) for arm in ("off", "on")}
    print(
        f"tracing at 100%: p50 {p50['on'] - p50['off']:+.2f} ms, p99 {p99['on'] - p99['off']:+.2f} ms "
        f"(medians over runs; base rate {args.rate:g} req/s, bursts at {2 * args.rate:g})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
