"""The switch drill of issue 12: switch a running service between two bundles, back and forth, under open-loop
bursty load through its one URL, and check that nothing fails, the tail holds, each user's model version changes
only at a switch, and a replica's memory grows by at most one bundle.

    python loadtests/rollout_drill.py --bundle-b artifacts/<other> [--url http://127.0.0.1:8000] [--rate 100]
                                      [--switches 10] [--out reports/rollout-drill]

Needs a running `recserve serve` (colocated), both bundles materialized (`recserve features materialize
--bundle DIR`), and an admin key in RECSERVE_API_KEY (checked against the service's GET /admin/rollout first).
The first bundle is the champion the service serves when the drill starts. Switches go through the same path as
`recserve rollout` (Serve's config API; no replica restarts). Load: Poisson arrivals at twice the base rate for 2 s
in every 10 (loadtests/arrivals.py), /recommend for the bundle's holdout users with 10% new ones.

Memory: the Ingress replicas' RSS (found in Ray's actor table), sampled every 0.5 s. "One bundle" is measured
first, in a fresh process that holds the first bundle's chain: what the second's adds, kept once loaded and at its
loading peak (parquet and Arrow buffers before they are handed back). A switch holds the old bundle while the new
one loads, so its growth is judged against the loading peak (within 10%).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chain.rollout import RolloutSpec
from loadtests import arrivals
from loadtests.traffic import load
from pipeline.commands import rollout
from settings import AuthSettings, ServeSettings

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Answer:
    sent: float  # monotonic s
    ended: float
    user: str
    status: int
    ms: float
    version: str = ""
    arm: str = ""
    degraded: bool = False
    error: str = ""


@dataclass
class Load:
    answers: list[Answer] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)


def drive(base: str, rate: float, users: list[str], out: Load, seed: int = 0) -> threading.Thread:
    """Open-loop bursty POST /recommend until out.stop is set, from a thread of its own. aiohttp, not httpx: on
    these 2 cores httpx's client took a whole core at 100 req/s and its own queue became the latency measured."""
    rng = random.Random(seed)

    async def go() -> None:
        connector = aiohttp.TCPConnector(limit=300)
        timeout = aiohttp.ClientTimeout(total=10.0)
        async with aiohttp.ClientSession(base, connector=connector, timeout=timeout) as client:
            times = arrivals.poisson_bursty(rate, rng, time.time())

            async def one(user: str) -> None:
                t = time.monotonic()
                try:
                    async with client.post("/recommend", json={"user_id": user, "k": 10}) as r:
                        text = await r.text()
                    body = json.loads(text) if r.status == 200 else {}
                    a = Answer(
                        t,
                        time.monotonic(),
                        user,
                        r.status,
                        (time.monotonic() - t) * 1000,
                        body.get("model_version", ""),
                        body.get("arm", ""),
                        bool(body.get("degraded")),
                        "" if r.status == 200 else text[:200],
                    )
                except (aiohttp.ClientError, TimeoutError) as exc:
                    a = Answer(t, time.monotonic(), user, 0, (time.monotonic() - t) * 1000, error=repr(exc)[:200])
                out.answers.append(a)

            tasks = set()
            for due in times:
                if out.stop.is_set():
                    break
                await asyncio.sleep(max(0.0, due - time.time()))
                user = rng.choice(users) if rng.random() > 0.1 else f"drill-new-{rng.randrange(10**9)}"
                task = asyncio.create_task(one(user))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)

    thread = threading.Thread(target=lambda: asyncio.run(go()), daemon=True)
    thread.start()
    return thread


def replica_pids(settings: ServeSettings) -> list[int]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.support.ray_replicas",
            f"--address=127.0.0.1:{settings.ray_port}",
            "--deployment=Ingress",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return [json.loads(line)["pid"] for line in out.stdout.splitlines() if line.startswith("{")]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def sample_memory(
    pids: list[int], out: list[tuple[float, dict[int, float]]], stop: threading.Event
) -> threading.Thread:
    def run() -> None:
        while not stop.is_set():
            out.append((time.monotonic(), {p: rss_mb(p) for p in pids}))
            time.sleep(0.5)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def peak(samples: list[tuple[float, dict[int, float]]], since: float, until: float) -> dict[int, float]:
    window = [s for t, s in samples if since <= t <= until] or [samples[-1][1]]
    return {p: max(s[p] for s in window) for p in window[0]}


_ONE_BUNDLE = """
import os, sys
from pathlib import Path
from settings import configure_process
configure_process(torch=True)
from models.bundle import load_core
from pipeline.serve.local import local_stages, trim_heap
def status(field):
    line = next(x for x in open("/proc/self/status") if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024
first = local_stages(load_core(Path(sys.argv[1])), 1)
trim_heap()
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) from here on
second = local_stages(load_core(Path(sys.argv[2])), 1)
peak = status("VmHWM")
trim_heap()
print(status("VmRSS") - before, peak - before)
"""


def one_bundle_mb(a: str, b: str) -> tuple[float, float]:
    """What `b`'s chain (snapshot, popularity, CF, content, blender) costs a process that holds `a`'s, in MB of
    RSS: what it keeps once loaded, and its peak while loading (parquet and Arrow buffers, pandas frames, before
    trim_heap hands them back)."""
    out = subprocess.run(
        [sys.executable, "-c", _ONE_BUNDLE, a, b], capture_output=True, text=True, cwd=ROOT, timeout=300, check=True
    )
    kept, peak = out.stdout.strip().splitlines()[-1].split()
    return float(kept), float(peak)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--bundle-a", type=Path, help="the first bundle (default: the champion the service serves now)")
    p.add_argument("--bundle-b", type=Path, required=True, help="the bundle to switch to and back from")
    p.add_argument("--rate", type=float, default=100.0, help="base rate, req/s (bursts at twice it)")
    p.add_argument("--switches", type=int, default=10, help="0: the same load without switches, for a baseline")
    p.add_argument("--duration-s", type=float, default=60.0, help="with --switches 0: how long the load runs")
    p.add_argument("--settle-s", type=float, default=5.0, help="load between switches")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "rollout-drill")
    args = p.parse_args()
    base = args.url.rstrip("/")
    settings = ServeSettings()
    key = AuthSettings().api_key
    # The drill changes the rollout as `recserve rollout` does: only for a caller the service takes as an admin.
    rollout.require_admin(base, key.get_secret_value() if key is not None else None)
    a = (
        str(args.bundle_a.resolve())
        if args.bundle_a
        else rollout.current_spec(rollout._driver(settings, None), base).champion.bundle
    )
    b = str(args.bundle_b.resolve())
    if a == b:
        p.error(f"--bundle-b {b} is the bundle the service serves now: name another one, or pass --bundle-a")
    specs = {a: RolloutSpec.single(a), b: RolloutSpec.single(b)}
    pids = replica_pids(settings)
    print(f"champion {a}; switching to and from {b}; Ingress replicas {pids}", flush=True)

    memory: list[tuple[float, dict[int, float]]] = []
    stop_memory = threading.Event()
    sampler = sample_memory(pids, memory, stop_memory)
    rollout.deploy(specs[a], base, 300.0, settings)
    kept_mb, loading_mb = one_bundle_mb(a, b)
    print(f"one bundle: {kept_mb:.1f} MB kept, {loading_mb:.1f} MB at its loading peak (a fresh process)", flush=True)

    users = load().users
    traffic = Load()
    loader = drive(base, args.rate, users, traffic)
    time.sleep(args.settle_s)
    switches = []  # (asked, live, bundle, pre-switch RSS, peak RSS)
    for n, bundle in zip(range(args.switches), itertools.cycle([b, a]), strict=False):
        before = {p: rss_mb(p) for p in pids}
        asked = time.monotonic()
        rollout.deploy(specs[bundle], base, 300.0, settings)
        live = time.monotonic()
        switches.append((asked, live, bundle, before, peak(memory, asked, live)))
        print(f"switch {n + 1}: to {Path(bundle).name} in {live - asked:.1f} s", flush=True)
        time.sleep(args.settle_s)
    if not args.switches:
        time.sleep(args.duration_s)
    traffic.stop.set()
    loader.join(60)
    stop_memory.set()
    sampler.join()

    answers = sorted(traffic.answers, key=lambda x: x.sent)
    failed = [x for x in answers if x.status != 200]
    ms = sorted(x.ms for x in answers)
    p50, p99 = ms[len(ms) // 2], ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    versions = {Path(s).name: None for s in specs}
    # Each user's version may change only while a switch is under way between two of their answers.
    flips, unexplained = 0, []
    by_user: dict[str, list[Answer]] = {}
    for x in answers:
        if x.status == 200:
            by_user.setdefault(x.user, []).append(x)
    for seq in by_user.values():
        for before, after in itertools.pairwise(seq):
            if before.version != after.version:
                flips += 1
                if not any(asked <= after.ended and live >= before.sent for asked, live, *_ in switches):
                    unexplained.append((before, after))
    growth = [max(pk[p] - pre[p] for p in pids) for *_, pre, pk in switches]
    result = {
        "answers": len(answers),
        "failed": len(failed),
        "degraded": sum(x.degraded for x in answers),
        "p50_ms": p50,
        "p99_ms": p99,
        "switch_s": [round(live - asked, 1) for asked, live, *_ in switches],
        "version_changes": flips,
        "version_changes_outside_a_switch": len(unexplained),
        "one_bundle_kept_mb": round(kept_mb, 1),
        "one_bundle_loading_peak_mb": round(loading_mb, 1),
        "rss_growth_per_switch_mb": [round(g, 1) for g in growth],
        "rss_first_mb": {p: round(memory[0][1][p], 1) for p in pids},
        "rss_last_mb": {p: round(memory[-1][1][p], 1) for p in pids},
        "bundles": list(versions),
    }
    verdicts = {
        "0 failed requests": not failed,
        "p99 <= 100 ms": p99 <= 100.0,
        "versions change only at a switch": not unexplained,
        # A switch holds the old bundle while the new one loads: its peak is one bundle's loading peak.
        "memory grows by at most one bundle in a switch": max(growth, default=0.0) <= 1.1 * loading_mb,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({**result, "verdicts": verdicts}, indent=2))
    (args.out / "answers.jsonl").write_text("\n".join(json.dumps(asdict(x)) for x in answers))
    print(json.dumps(result, indent=2))
    for bar, ok in verdicts.items():
        print(f"{'met' if ok else 'NOT MET'}: {bar}")
    for x in failed[:5]:
        print("failed:", x)
    return 0 if all(verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
