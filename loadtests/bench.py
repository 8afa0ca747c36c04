"""Four systems side by side, same models, bundle and traffic: the highest arrival rate each holds at p99 <= 100 ms
with no errors and <= 1% degraded, what a request costs in CPU, how recserve sheds overload, and issue 10's bars.

    python loadtests/bench.py [--systems colocated distributed naive floor] [--arrival poisson-bursty]
                              [--step-s 20] [--rates 10,20,...] [--rounds 1] [--out reports/bench] [--overload-s 30]

For each system in turn (rounds rotate the order, so drift in this machine's speed spreads over all four), it
starts the system, steps the offered rate up (locust, open loop, the gate's traffic mix) until a step fails the
SLO gate, and stops it. Arrivals are poisson-bursty by default: Poisson, at twice the base rate for 2 s in every
10 s (loadtests/arrivals.py). Every rate here is the base rate; the mean offered rate is 1.2x it. Per step:
client p50/p95/p99, CPU-ms per request (the machine's busy CPU less the load generator's, over the requests
answered) and the load generator's CPU share. For recserve, per-stage p50/p99 at the highest rate that held come
from its Prometheus metrics. With --overload-s, recserve colocated is then driven at that rate, at twice it, and
at it again, to show load shedding (503 + Retry-After) and recovery. Writes results.json, latency.png and
table.md (the table and the bars' verdict) to --out, and prints them. It prints its expected length first.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests import arrivals
from loadtests.bars import verdict_lines, verdict_markdown, verdicts
from loadtests.systems import ROOT, SYSTEMS, Step, locust_step, running
from pipeline.serve.metrics import histogram_quantile
from settings import ServeSettings

# Fine steps around the bars (colocated 200, floor 200-350 with 0.75x of it) and coarse ones elsewhere; 10 is there
# because naive Ray Serve may hold nothing above it.
RATES = (10, 20, 40, 80, 120, 160, 180, 200, 220, 250, 300, 350, 400, 500)
METRIC_LAG_S = 10  # Ray's metrics agent exports every ~10 s
IDLE_S = 8.0  # the idle CPU measurement before the steps

# For the length estimate only (s): start to warm plus stop, and where each system stopped climbing, from the
# runs of docs/benchmarks.md; a step also pays locust's start and exit and the bundle's traffic load.
START_STOP_S = {"colocated": 55, "distributed": 70, "naive": 65, "floor": 40}
EXPECTED_MAX = {"colocated": 250, "distributed": 140, "naive": 20, "floor": 300}
STEP_OVERHEAD_S = 6


def busy_cpu_s() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def scrape() -> dict[tuple[str, str, float], float]:
    """Cumulative histogram buckets of recserve's stage and request latencies, summed over replicas."""
    with urllib.request.urlopen(f"http://127.0.0.1:{ServeSettings().metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[tuple[str, str, float], float] = {}
    pattern = re.compile(r"^ray_recserve_(stage|request)_latency_ms_bucket\{(.*)\} (\S+)$", re.M)
    for kind, labels, value in pattern.findall(text):
        tags = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        name = tags.get("stage") or f"request {tags.get('route')}"
        key = (kind, name, float(tags["le"]))
        out[key] = out.get(key, 0.0) + float(value)
    return out


def stage_quantiles(before: dict, after: dict) -> dict[str, dict[str, float]]:
    names = sorted({(k[0], k[1]) for k in after})
    out = {}
    for kind, name in names:
        buckets = sorted(
            (le, after[(kind, name, le)] - before.get((kind, name, le), 0.0))
            for (k, nm, le) in after
            if k == kind and nm == name
        )
        if buckets and buckets[-1][1] > 0:
            out[name] = {
                "p50": histogram_quantile(buckets, 0.5),
                "p99": histogram_quantile(buckets, 0.99),
                "n": buckets[-1][1],
            }
    return out


def idle_cpu_s_per_s(seconds: float = IDLE_S) -> float:
    """What the system burns with no load (Ray's own processes, pollers): CPU-s per second."""
    busy0, t0 = busy_cpu_s(), time.monotonic()
    time.sleep(seconds)
    return (busy_cpu_s() - busy0) / (time.monotonic() - t0)


def measured(
    url: str,
    rate: float,
    seconds: float,
    report: Path,
    idle: float,
    *extra: str,
    arrival: str = "poisson-bursty",
    rate_per_user: float = 1.0,
) -> tuple[Step, dict[str, float]]:
    busy0 = busy_cpu_s()
    step = locust_step(url, rate, seconds, report, *extra, arrival=arrival, rate_per_user=rate_per_user)
    busy = busy_cpu_s() - busy0
    answered = max(step.requests - step.failures - step.shed, 1)
    server = busy - step.locust_cpu_s
    cost = {
        # Everything but the load generator: the server's processes, Redis, and the idle work of Ray itself.
        "cpu_ms_per_request": server * 1000 / answered,
        # Less what the same system burns with no load, measured before the steps: the per-request work.
        "net_cpu_ms_per_request": (server - idle * step.wall_s) * 1000 / answered,
        "locust_cpu_share": step.locust_cpu_s / (step.wall_s * psutil.cpu_count()),
        "machine_busy_share": busy / (step.wall_s * psutil.cpu_count()),
    }
    return step, cost


def run_system(name: str, rates: tuple[int, ...], step_s: float, out: Path, arrival: str, rate_per_user: float) -> dict:
    system = SYSTEMS[name]
    steps: list[dict] = []
    stages: dict[str, dict[str, float]] = {}
    started = time.monotonic()
    with running(system, out / name / "server.log") as url:
        up_s = time.monotonic() - started
        idle = idle_cpu_s_per_s()
        print(f"  {system.label}: up in {up_s:.0f} s, idle CPU {idle * 1000:.0f} ms/s", flush=True)
        for rate in rates:
            before = scrape() if system.ray else {}
            step, cost = measured(
                url, rate, step_s, out / name / f"rate{rate}", idle, arrival=arrival, rate_per_user=rate_per_user
            )
            print(
                f"  {system.label} @ {rate}/s base: {step.line}; CPU {cost['cpu_ms_per_request']:.1f} ms/req "
                f"({cost['net_cpu_ms_per_request']:.1f} above idle), locust {cost['locust_cpu_share']:.0%} of the "
                "machine",
                flush=True,
            )
            if system.ray:
                time.sleep(METRIC_LAG_S)
                if step.passed:
                    stages = stage_quantiles(before, scrape())
            else:
                time.sleep(2)
            steps.append({**asdict(step), **cost})
            if not step.passed:
                break
    held = [s for s in steps if s["passed"]]
    return {
        "system": name,
        "label": system.label,
        "url": url,
        "startup_s": up_s,
        "idle_cpu_ms_per_s": idle * 1000,
        "max_rate": held[-1]["rate"] if held else 0,
        "at_max": held[-1] if held else None,
        "stages_at_max": stages,
        "steps": steps,
    }


def overload(rate: float, seconds: float, out: Path, arrival: str, rate_per_user: float) -> list[dict]:
    """recserve colocated at the rate it held, at twice it, and at it again: shed, then recover by itself."""
    phases = []
    with running(SYSTEMS["colocated"], out / "overload" / "server.log") as url:
        idle = idle_cpu_s_per_s()
        for label, r in (("held rate", rate), ("2x overload", 2 * rate), ("back to held rate", rate)):
            report = out / "overload" / label.replace(" ", "-")
            step, cost = measured(
                url, r, seconds, report, idle, "--shed-ok", arrival=arrival, rate_per_user=rate_per_user
            )
            print(f"  overload phase {label} @ {r:g}/s: {step.line}", flush=True)
            phases.append({"phase": label, **asdict(step), **cost})
    return phases


def _range(values: list[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return format(lo, fmt) if lo == hi else f"{lo:{fmt}}–{hi:{fmt}}"


def table(results: list[dict], shown: list[dict]) -> str:
    """One row a system: the max rate in each round, and the ratios within each round (systems measured side by
    side); latency and CPU at the max rate of the row's shown (lower-median) round."""
    rate = {(r["system"], r["round"]): r["max_rate"] for r in results}
    rounds = sorted({r["round"] for r in results})

    def ratios(name: str, ref: str) -> str:
        values = [rate[(name, k)] / rate[(ref, k)] for k in rounds if rate.get((ref, k)) and (name, k) in rate]
        return _range(values, ".2f") if values else "—"

    rows = [
        "| system | max base req/s at p99 ≤ 100 ms (by round) | p50 / p99 there (ms) | CPU ms/req there (above idle) "
        "| idle CPU ms/s | locust CPU share | ×naive | ×floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in shown:
        m = r["at_max"]
        lat = f"{m['p50']:.0f} / {m['p99']:.0f}" if m else "—"
        cpu = f"{m['cpu_ms_per_request']:.1f} ({m['net_cpu_ms_per_request']:.1f})" if m else "—"
        share = f"{m['locust_cpu_share']:.0%}" if m else "—"
        by_round = " / ".join(str(rate[(r["system"], k)]) for k in rounds if (r["system"], k) in rate)
        rows.append(
            f"| {r['label']} | {by_round} | {lat} | {cpu} | {r['idle_cpu_ms_per_s']:.0f} | {share} | "
            f"{ratios(r['system'], 'naive')} | {ratios(r['system'], 'floor')} |"
        )
    return "\n".join(rows)


def arrival_note(arrival: str) -> str:
    """What the rates in the table mean."""
    if arrival == "poisson-bursty":
        b = arrivals.BURSTS
        return (
            f"Arrivals: open-loop Poisson at {b.factor:g}× the base rate for {b.burst_s:g} s in every {b.period_s:g} s "
            f"(bursts aligned across users); rates are base rates, the mean offered rate is {b.mean_factor:g}× them. "
            "A step holds with p99 ≤ 100 ms, no failed request (a 503 counts) and ≤ 1% degraded."
        )
    return (
        "Arrivals: open loop, each user on a fixed schedule (steady). "
        "A step holds with p99 ≤ 100 ms, no failed request (a 503 counts) and ≤ 1% degraded."
    )


def estimate_s(
    systems: list[str],
    rates: tuple[int, ...],
    step_s: float,
    rounds: int,
    overload_s: float,
    expected: dict[str, float] = EXPECTED_MAX,
) -> tuple[float, float]:
    """The run's expected and longest length (s): each system steps up to the first rate above what it held in the
    last documented run (EXPECTED_MAX), or through every rate. A step costs step_s, locust's overhead and, for
    Ray, the metrics export wait; a system costs its start, stop and the idle measurement."""

    def system_s(name: str, steps: int) -> float:
        step = step_s + STEP_OVERHEAD_S + (METRIC_LAG_S if SYSTEMS[name].ray else 2)
        return START_STOP_S.get(name, 60) + IDLE_S + steps * step

    def steps_to_fail(name: str) -> int:
        held = [r for r in rates if r <= expected.get(name, max(rates))]
        return min(len(held) + 1, len(rates))

    extra = START_STOP_S["colocated"] + IDLE_S + 3 * (overload_s + STEP_OVERHEAD_S) if overload_s > 0 else 0.0
    typical = rounds * sum(system_s(n, steps_to_fail(n)) for n in systems) + extra
    longest = rounds * sum(system_s(n, len(rates)) for n in systems) + extra
    return typical, longest


def plot(results: list[dict], path: Path, arrival: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(results):
        rates = [s["rate"] for s in r["steps"]]
        color = f"C{i}"
        ax.plot(rates, [s["p99"] for s in r["steps"]], "o-", color=color, label=f"{r['label']} p99")
        ax.plot(rates, [s["p50"] for s in r["steps"]], "s--", color=color, alpha=0.6, label=f"{r['label']} p50")
        failed = [s for s in r["steps"] if not s["passed"]]
        ax.plot([s["rate"] for s in failed], [s["p99"] for s in failed], "x", color="black", ms=10)
    ax.plot([], [], "x", color="black", ms=10, label="step failed the gate (p99, errors or shed)")
    ax.axhline(100, color="red", lw=1, ls=":", label="SLO: p99 100 ms")
    mean = arrivals.mean_factor(arrival)
    ax.set_xlabel(f"offered base rate (requests/s, open loop, {arrival}" + (f"; mean {mean:g}×)" if mean != 1 else ")"))
    ax.set_ylabel("latency (ms, client side)")
    ax.set_yscale("log")
    ax.set_title("recserve vs naive Ray Serve vs in-process floor (2 cores, CPU)")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--systems", nargs="+", default=["colocated", "distributed", "naive", "floor"], choices=SYSTEMS)
    p.add_argument("--rates", default=",".join(map(str, RATES)), help="offered base rates to step through (req/s)")
    p.add_argument(
        "--arrival",
        choices=sorted(arrivals.PATTERNS),
        default="poisson-bursty",
        help="arrival pattern (default: %(default)s; the SLO gate uses steady)",
    )
    p.add_argument(
        "--rate-per-user",
        type=float,
        default=1.0,
        help="base req/s per simulated user: a user sends one request at a time, so with Poisson gaps a low rate "
        "keeps arrivals from waiting behind the user's request in flight (default: %(default)s)",
    )
    p.add_argument("--step-s", type=float, default=20.0, help="seconds a step (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--overload-s", type=float, default=30.0, help="0 skips the overload run")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "bench")
    args = p.parse_args()
    rates = tuple(int(r) for r in args.rates.split(","))
    period = arrivals.BURSTS.period_s
    if args.arrival == "poisson-bursty" and (args.step_s % period or args.overload_s % period):
        # Bursts sit at fixed wall-clock seconds: any whole number of periods holds the same share of them.
        p.error(f"--step-s and --overload-s must be whole multiples of the {period:g} s burst period")
    typical, longest = estimate_s(args.systems, rates, args.step_s, args.rounds, args.overload_s)
    print(
        f"{len(args.systems)} systems x {args.rounds} round(s), {len(rates)} rates up to {max(rates)}/s, "
        f"{args.step_s:g} s a step, {args.arrival} arrivals: about {typical / 60:.0f} min "
        f"(each system stopping where it did in the last documented run), at most {longest / 60:.0f} min",
        flush=True,
    )
    began = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    for round_ in range(args.rounds):
        k = round_ % len(args.systems)
        for name in args.systems[k:] + args.systems[:k]:
            print(f"round {round_ + 1}: {SYSTEMS[name].label}", flush=True)
            run = run_system(name, rates, args.step_s, args.out, args.arrival, args.rate_per_user)
            results.append({**run, "round": round_ + 1})
    # Per system, the round with the lower-median max rate: with two rounds, the worse one.
    best = []
    for name in args.systems:
        mine = sorted((r for r in results if r["system"] == name), key=lambda r: r["max_rate"])
        best.append(mine[(len(mine) - 1) // 2])
    phases = []
    colocated = next((r for r in best if r["system"] == "colocated"), None)
    if args.overload_s > 0 and colocated and colocated["max_rate"]:
        phases = overload(colocated["max_rate"], args.overload_s, args.out, args.arrival, args.rate_per_user)
    held: dict[int, dict[str, float]] = {}
    for r in results:
        held.setdefault(r["round"], {})[r["system"]] = r["max_rate"]
    bars = verdicts(held, min(rates))
    md = "\n\n".join(
        [
            table(results, best),
            arrival_note(args.arrival),
            "**Bars (issue 10)**, on the max base rates held in the same round:",
            verdict_markdown(bars),
        ]
    )
    meta = {
        "arrival": args.arrival,
        "mean_rate_factor": arrivals.mean_factor(args.arrival),
        "rate_per_user": args.rate_per_user,
        "step_s": args.step_s,
        "rates": rates,
        "minutes": (time.monotonic() - began) / 60,
    }
    (args.out / "results.json").write_text(
        json.dumps({**meta, "runs": results, "overload": phases, "bars": bars}, indent=1)
    )
    (args.out / "table.md").write_text(md + "\n")
    plot(best, args.out / "latency.png", args.arrival)
    print(md)
    for r in best:
        if r["stages_at_max"]:
            stages = ", ".join(f"{k} {v['p50']:.1f}/{v['p99']:.1f}" for k, v in r["stages_at_max"].items())
            print(f"{r['label']} at {r['max_rate']}/s, server-side p50/p99 ms: {stages}")
    print("Bars (issue 10):", *verdict_lines(bars), sep="\n")
    print(f"took {meta['minutes']:.0f} min (estimated {typical / 60:.0f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
