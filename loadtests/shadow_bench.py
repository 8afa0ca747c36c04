"""The shadow bar of issue 12: what a shadow arm costs the callers. The same open-loop bursty load runs through
the service's one URL while the rollout alternates between the champion alone and the champion with a shadow of
`--shadow` percent of requests, phase by phase (off, on, off, on, ...), so a drift of the machine over the run
falls on both sides alike. Prints the champion's p50 and p99 with the shadow off and on, per phase and pooled, and
the shadow's own counts, overlap@10 and rank correlation from the metrics.

    python loadtests/shadow_bench.py --bundle-b artifacts/<other> [--shadow 100] [--rate 40] [--phases 6]
                                     [--phase-s 30] [--out reports/shadow-bench]

Needs a running `recserve serve` (colocated), both bundles materialized. Bar: the shadow adds at most 1 ms to the
champion's p50.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chain.rollout import ArmSpec, RolloutSpec
from loadtests.rollout_drill import Load, drive
from loadtests.traffic import load
from pipeline.commands import rollout
from pipeline.commands.serve import http_get
from pipeline.serve.metrics import histogram_quantile
from settings import ServeSettings

ROOT = Path(__file__).resolve().parents[1]
SETTLE_S = 3.0  # after a switch, before answers count: the switch itself is not the shadow's cost


def shadow_metrics(url: str) -> dict[str, object]:
    """The shadow's counters and the medians of its agreement histograms, summed over replicas."""
    from prometheus_client.parser import text_string_to_metric_families

    code, text = http_get(url, 5.0)
    if code != 200:
        return {}
    outcomes: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "ray_recserve_shadow_requests_total":
                outcomes[s.labels["outcome"]] = outcomes.get(s.labels["outcome"], 0.0) + s.value
            for name in ("overlap_at_10", "rank_concordance", "latency_ms"):
                if s.name == f"ray_recserve_shadow_{name}_bucket":
                    le = float(s.labels["le"])
                    buckets.setdefault(name, {})[le] = buckets.setdefault(name, {}).get(le, 0.0) + s.value
    medians = {f"{n}_p50": histogram_quantile(sorted(b.items()), 0.5) for n, b in buckets.items()}
    return {"outcomes": outcomes, **medians}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--bundle-a", type=Path, help="the champion (default: the one the service serves now)")
    p.add_argument("--bundle-b", type=Path, required=True, help="the shadow's bundle")
    p.add_argument("--shadow", type=float, default=100.0, help="percent of requests the shadow answers too")
    p.add_argument("--rate", type=float, default=40.0, help="base rate, req/s (bursts at twice it)")
    p.add_argument("--phases", type=int, default=6, help="phases in all, alternating off and on (even)")
    p.add_argument("--phase-s", type=float, default=30.0)
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "shadow-bench")
    args = p.parse_args()
    base = args.url.rstrip("/")
    settings = ServeSettings()
    a = (
        str(args.bundle_a.resolve())
        if args.bundle_a
        else rollout.current_spec(rollout._driver(settings, None), base).champion.bundle
    )
    off = RolloutSpec(salt="shadow-bench", arms=(ArmSpec(name="champion", bundle=a, weight=100, role="champion"),))
    shadow = ArmSpec(name="shadow", bundle=str(args.bundle_b.resolve()), weight=args.shadow, role="shadow")
    on = RolloutSpec(salt="shadow-bench", arms=(*off.arms, shadow))
    rollout.deploy(on, base, 300.0, settings)  # both loaded and warmed once, before any phase is measured
    traffic = Load()
    loader = drive(base, args.rate, load().users, traffic)
    phases = []  # (shadow on, counted from, until)
    for n in range(args.phases):
        spec = on if n % 2 else off
        rollout.deploy(spec, base, 300.0, settings)
        began = time.monotonic()
        time.sleep(args.phase_s)
        phases.append((spec is on, began + SETTLE_S, time.monotonic()))
        print(f"phase {n + 1}: shadow {'on' if spec is on else 'off'}", flush=True)
    traffic.stop.set()
    loader.join(60)
    rollout.deploy(off, base, 300.0, settings)

    def ms(shadow: bool | None, phase: tuple[bool, float, float] | None = None) -> list[float]:
        spans = [phase] if phase else [ph for ph in phases if ph[0] == shadow]
        return sorted(x.ms for x in traffic.answers if x.status == 200 and any(f <= x.sent < u for _, f, u in spans))

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    per_phase = [
        {"shadow": ph[0], "answers": len(v := ms(None, ph)), "p50_ms": pct(v, 0.5), "p99_ms": pct(v, 0.99)}
        for ph in phases
    ]
    pooled = {k: ms(k) for k in (False, True)}
    failed = sum(x.status != 200 for x in traffic.answers)
    delta = pct(pooled[True], 0.5) - pct(pooled[False], 0.5)
    paired = [b["p50_ms"] - a["p50_ms"] for a, b in zip(per_phase[::2], per_phase[1::2], strict=False)]
    result = {
        "rate": args.rate,
        "shadow_percent": args.shadow,
        "failed": failed,
        "off": {"answers": len(pooled[False]), "p50_ms": pct(pooled[False], 0.5), "p99_ms": pct(pooled[False], 0.99)},
        "on": {"answers": len(pooled[True]), "p50_ms": pct(pooled[True], 0.5), "p99_ms": pct(pooled[True], 0.99)},
        "p50_added_ms": delta,
        "p50_added_ms_per_pair": paired,
        "p50_added_ms_median_pair": statistics.median(paired) if paired else float("nan"),
        "phases": per_phase,
        "shadow": shadow_metrics(f"http://127.0.0.1:{settings.metrics_port}/metrics"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    ok = failed == 0 and delta <= 1.0
    print(f"{'met' if delta <= 1.0 else 'NOT MET'}: the shadow adds <= 1 ms to the champion's p50 ({delta:+.2f} ms)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
