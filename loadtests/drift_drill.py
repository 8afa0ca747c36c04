"""The drift drill: the holdout period's real traffic replayed through the chain, then injected shifts, in-process.

    python -m loadtests.drift_drill [--bundle DIR] [--margin 1.5] [--out drift.json]

1. Replay: every invoice in [cutoff, holdout_end) of the bundle's data is one /recommend of its customer, in time
   order (a customer the bundle does not know is a new user), 5% of them with a product query (the load
   generator's share, models/drift.py EXPECTED_QUERY_SHARE). Each request goes through the chain's own steps
   (chain/offline.py: fetch, retrieve, merge, hydrate) and its blender inputs into a `DriftMonitor` exactly as
   serving's chain feeds it. Reported: the highest PSI and JS distance per feature over every window, and the
   thresholds they suggest per tier (chain/drift.py: calendar, steady): the tier's highest, times the margin.
2. Shifts, each after one full window of replayed traffic: a cohort of big spenders (known users in the top decile
   of user_total_spend), a change in the country mix (only customers outside the most frequent country), a run of
   only new users. Reported: the requests from the shift's start until a window first has a feature over the
   thresholds (per tier, chain/drift.py THRESHOLDS), the features flagged, and the monitor's values then.
   Then the report against the gauges: the shift's first window (1,000 requests) logged as a replica logs it
   (pipeline/serve/driftlog.py) and run through `recserve drift report` (Evidently over the reference's bins);
   reported: per feature, the live gauges', the report's gauges' (from the log) and Evidently's verdicts, and how
   many of the 27 agree.
3. Cost: `DriftMonitor.observe` over the replay's real requests, µs per request (best of 5 timeit runs), with and
   without the request-feature log (pipeline/serve/driftlog.py) the report reads.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import timeit
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from chain.drift import BLOCK, BLOCKS, THRESHOLDS, DriftMonitor, request_features, tier
from chain.offline import OfflineChain, open_offline
from chain.types import Query
from models.bundle import load_core
from models.data import CleanData, load_clean, window
from models.drift import EXPECTED_QUERY_SHARE, Reference, RequestFeatures
from settings import DATA_FILE, Settings
from training.queries import PRODUCT_QUERIES

SHIFTS = ("big_spenders", "country_mix", "new_users")
FLAG_WITHIN = 2000  # the bar: each shift flagged within this many requests
MAX_SHIFTED = 4000  # how long a shift runs before it is reported as not flagged


def holdout_queries(data: CleanData, manifest_split: dict[str, str], seed: int = 0) -> list[Query]:
    """One Query per invoice in [cutoff, holdout_end), in time order; EXPECTED_QUERY_SHARE of them with a query."""
    cutoff, end = pd.Timestamp(manifest_split["cutoff"]), pd.Timestamp(manifest_split["holdout_end"])
    rows = window(data.interactions, cutoff, end)
    invoices = rows.groupby("invoice", observed=True).agg(user=("user_id", "first"), ts=("ts", "min"))
    invoices = invoices.sort_values(["ts", "user"])
    rng = random.Random(seed)
    return [
        Query(str(u), query=rng.choice(PRODUCT_QUERIES) if rng.random() < EXPECTED_QUERY_SHARE else None)
        for u in invoices["user"].tolist()
    ]


class Features:
    """Request features through the chain, cached: without events, a known user's request (and every new user's)
    has the same features each time."""

    def __init__(self, chain: OfflineChain) -> None:
        self.chain = chain
        self._cache: dict[tuple[str, str | None], RequestFeatures] = {}

    def __call__(self, q: Query) -> RequestFeatures:
        key = (q.user_id if q.user_id in self.chain.snapshot.user_index else "<new>", q.query)
        f = self._cache.get(key)
        if f is None:
            r = self.chain.retrieve(q)
            f = self._cache[key] = request_features(r.context, self.chain.hydrate(r).x)
        return f


@dataclass
class Replay:
    requests: int
    windows: int
    max_psi: dict[str, float]
    max_js: dict[str, float]
    alarms: list[str] = field(default_factory=list)  # features over the committed thresholds at any window

    def thresholds(self, margin: float) -> dict[str, tuple[float, float]]:
        """Per tier, the highest PSI and JS over its features and every window, times `margin`, rounded up to
        0.01."""
        out = {}
        for t in ("steady", "calendar"):
            top_psi = max(v for k, v in self.max_psi.items() if tier(k) == t)
            top_js = max(v for k, v in self.max_js.items() if tier(k) == t)
            out[t] = (math.ceil(top_psi * margin * 100) / 100, math.ceil(top_js * margin * 100) / 100)
        return out


def replay(
    reference: Reference, features: list[RequestFeatures], thresholds: dict[str, tuple[float, float]] = THRESHOLDS
) -> Replay:
    """Every request into a fresh monitor; the max per feature over the windows as they close."""
    monitor = DriftMonitor(reference)
    max_psi = dict.fromkeys(monitor.values, 0.0)
    max_js = dict.fromkeys(monitor.values, 0.0)
    alarms: set[str] = set()
    windows = 0
    for f in features:
        before = monitor.requests // monitor.block
        monitor.observe(f)
        if monitor.requests // monitor.block != before:
            windows += 1
            for name, (p, j) in monitor.values.items():
                max_psi[name], max_js[name] = max(max_psi[name], p), max(max_js[name], j)
            alarms.update(monitor.over(thresholds))
    return Replay(len(features), windows, max_psi, max_js, sorted(alarms))


def shifted_users(chain: OfflineChain, kind: str) -> Callable[[int], Query]:
    """The n-th request of a shift (SHIFTS): a big spender, a customer outside the main country, a new user."""
    frame = chain.snapshot.user_frame
    if kind == "big_spenders":
        spend = frame["user_total_spend"].astype(float)
        users = sorted(frame.index[spend >= spend.quantile(0.9)].astype(str))
    elif kind == "country_mix":
        main = frame["user_country"].value_counts().index[0]
        users = sorted(frame.index[frame["user_country"] != main].astype(str))
    elif kind == "new_users":
        users = [f"drill-new-{n}" for n in range(MAX_SHIFTED)]
    else:
        raise ValueError(f"unknown shift {kind!r}: one of {SHIFTS}")
    rng = random.Random(kind)
    # The query share stays the reference's: a shift changes who asks, not how.
    order = [
        Query(rng.choice(users), query=rng.choice(PRODUCT_QUERIES) if rng.random() < EXPECTED_QUERY_SHARE else None)
        for _ in range(MAX_SHIFTED)
    ]
    return lambda n: order[n % len(order)]


@dataclass
class Flagged:
    shift: str
    requests: int | None  # shifted requests until a window was over the thresholds; None: not within MAX_SHIFTED
    features: list[str]
    values: dict[str, tuple[float, float]]


def inject(
    reference: Reference,
    warm: list[RequestFeatures],
    shifted: Iterator[RequestFeatures],
    kind: str,
    thresholds: dict[str, tuple[float, float]] = THRESHOLDS,
) -> Flagged:
    """One full window of `warm` traffic (it must raise nothing), then `shifted` until a window is over."""
    monitor = DriftMonitor(reference)
    for f in warm[: BLOCK * BLOCKS]:
        monitor.observe(f)
    if monitor.over(thresholds):
        raise AssertionError(f"the warm-up traffic is already over the thresholds: {monitor.over(thresholds)}")
    for n, f in enumerate(shifted, 1):
        monitor.observe(f)
        if monitor.requests % monitor.block == 0 and (over := monitor.over(thresholds)):
            return Flagged(kind, n, over, {k: monitor.values[k] for k in over})
        if n >= MAX_SHIFTED:
            break
    return Flagged(kind, None, [], {})


def shift_stream(chain: OfflineChain, features: Features, kind: str) -> Iterator[RequestFeatures]:
    user = shifted_users(chain, kind)
    for n in range(MAX_SHIFTED):
        yield features(user(n))


def logged_window(
    reference: Reference, shifted: Iterator[RequestFeatures], directory: Path, version: str
) -> tuple[DriftMonitor, pd.DataFrame]:
    """One full window (BLOCK * BLOCKS requests) of `shifted` through a fresh monitor that logs as a replica does
    (pipeline/serve/driftlog.py); the monitor (its gauges over exactly those requests) and the logged rows."""
    from pipeline.serve.driftlog import DriftLog, read_window

    log = DriftLog(directory, version)
    monitor = DriftMonitor(reference, log=log.append)
    for _, f in zip(range(BLOCK * BLOCKS), shifted, strict=False):
        monitor.observe(f)
    log.close()
    return monitor, read_window(directory, version, 86400)


def agreement(reference: Reference, shifted: Iterator[RequestFeatures], version: str) -> dict[str, Any]:
    """`recserve drift report` over one logged window of a shift: per feature the live gauges' verdict and values,
    the report's (gauges from the log, Evidently), and the agreement counts."""
    from pipeline.commands.drift import report

    with tempfile.TemporaryDirectory() as tmp:
        monitor, logged = logged_window(reference, shifted, Path(tmp), version)
        verdicts = report(reference, logged, Path(tmp) / "report.html")
    live = set(monitor.over())
    return {
        "requests": len(logged),
        "evidently_vs_log_gauges": sum(v.agree for v in verdicts),
        "evidently_vs_live_gauges": sum(v.evidently_drift == (v.feature in live) for v in verdicts),
        "features": len(verdicts),
        "per_feature": {
            v.feature: {
                "live": [*monitor.values[v.feature], v.feature in live],
                "log": [v.gauge_psi, v.gauge_js, v.gauge_drift],
                "evidently": [v.evidently_psi, v.evidently_js, v.evidently_drift],
            }
            for v in verdicts
        },
    }


def cost_us(reference: Reference, features: list[RequestFeatures], log: bool = False) -> float:
    """µs per DriftMonitor.observe over the real requests (best of 5 runs), with the request log when `log`."""
    from pipeline.serve.driftlog import DriftLog

    with tempfile.TemporaryDirectory() as tmp:
        sink = DriftLog(Path(tmp), "drill") if log else None
        monitor = DriftMonitor(reference, log=sink.append if sink else None)
        observe = monitor.observe
        runs = timeit.repeat(lambda: [observe(f) for f in features], number=1, repeat=5)
        if sink is not None:
            sink.close()
    return min(runs) / len(features) * 1e6


def run(
    bundle: Path,
    data: CleanData,
    margin: float = 1.5,
    shifts: tuple[str, ...] = SHIFTS,
    thresholds: dict[str, tuple[float, float]] | None = None,
) -> dict[str, Any]:
    """The whole drill over a bundle and the data it was trained on; the report as a dict. The shifts are judged
    by `thresholds` (tier: (PSI, JS)), default: the ones this replay suggests."""
    chain = open_offline(bundle)
    core = load_core(bundle)
    if core.drift is None:
        raise SystemExit(f"{bundle} has no drift reference: retrain it with this version")
    feats = Features(chain)
    holdout = [feats(q) for q in holdout_queries(data, core.manifest.split)]
    rep = replay(core.drift, holdout)
    judged = thresholds or rep.thresholds(margin)
    flagged = [inject(core.drift, holdout, shift_stream(chain, feats, k), k, judged) for k in shifts]
    agreed = {k: agreement(core.drift, shift_stream(chain, feats, k), core.version) for k in shifts}
    return {
        "bundle": str(bundle),
        "holdout": {"requests": rep.requests, "windows": rep.windows, "alarms": rep.alarms},
        "max_psi": rep.max_psi,
        "max_js": rep.max_js,
        "suggested_thresholds": rep.thresholds(margin),
        "margin": margin,
        "thresholds": THRESHOLDS,
        "shift_thresholds": judged,
        "shifts": {f.shift: {"requests": f.requests, "features": f.features, "values": f.values} for f in flagged},
        "report": agreed,
        "cost_us": {"monitor": cost_us(core.drift, holdout), "monitor_and_log": cost_us(core.drift, holdout, True)},
    }


def main() -> int:
    p = argparse.ArgumentParser(description="holdout replay, injected shifts and cost of the drift monitor")
    p.add_argument("--bundle", type=Path, default=None, help="default: the bundle artifacts/LATEST names")
    p.add_argument("--margin", type=float, default=1.5, help="thresholds = the replay's highest values x margin")
    p.add_argument("--out", type=Path, default=None, help="also write the report as JSON here")
    args = p.parse_args()
    bundle = args.bundle or Settings().latest_bundle()
    report = run(bundle, load_clean(DATA_FILE), args.margin)
    top = sorted(report["max_psi"], key=lambda k: -report["max_psi"][k])[:5]
    print(f"holdout replay: {report['holdout']}")
    print("highest PSI: " + ", ".join(f"{k} {report['max_psi'][k]:.3f}" for k in top))
    top = sorted(report["max_js"], key=lambda k: -report["max_js"][k])[:5]
    print("highest JS:  " + ", ".join(f"{k} {report['max_js'][k]:.3f}" for k in top))
    print(f"suggested thresholds (x{args.margin}): {report['suggested_thresholds']}; committed {report['thresholds']}")
    print(f"shifts judged by {report['shift_thresholds']}")
    for name, s in report["shifts"].items():
        print(f"shift {name}: flagged after {s['requests']} requests on {s['features']}")
    for name, a in report["report"].items():
        differ = [f for f, v in a["per_feature"].items() if v["evidently"][2] != v["live"][2]]
        print(
            f"report {name}: Evidently agrees with the log's gauges on {a['evidently_vs_log_gauges']} of "
            f"{a['features']}, with the live gauges on {a['evidently_vs_live_gauges']} (differ: {differ})"
        )
    print(f"cost: {report['cost_us']['monitor']:.1f} µs/request, {report['cost_us']['monitor_and_log']:.1f} with log")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
