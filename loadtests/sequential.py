"""Sequential latency of POST /recommend through a running recserve, as a client sees it.

    python loadtests/sequential.py --url http://127.0.0.1:8000 [--n 1000] [--bundle DIR]

Users are the bundle's holdout users (bought before and after the cutoff), with 10% ids the bundle never saw.
Prints the client's p50/p95/p99, errors, degraded answers and the per-stage medians the service reports.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests import traffic


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--bundle", type=Path, help="default: the one artifacts/LATEST names")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    users = traffic.load(args.bundle).users
    rng = random.Random(args.seed)
    latencies, errors, degraded = [], 0, 0
    stages: dict[str, list[float]] = {}
    with httpx.Client(base_url=args.url, timeout=10) as client:
        for n in range(args.n):
            user = f"new-{n}" if rng.random() < 0.1 else rng.choice(users)
            started = time.perf_counter()
            r = client.post("/recommend", json={"user_id": user, "k": 10})
            latencies.append((time.perf_counter() - started) * 1000)
            if r.status_code != 200:
                errors += 1
                continue
            body = r.json()
            degraded += bool(body["degraded"])
            for stage, ms in body["timings_ms"].items():
                stages.setdefault(stage, []).append(ms)
    lat = np.asarray(latencies)
    p50, p95, p99 = np.percentile(lat, [50, 95, 99])
    medians = ", ".join(f"{s} {np.median(v):.2f}" for s, v in stages.items())
    print(
        f"{args.n} sequential /recommend at {args.url} ({len(users)} holdout users, 10% unknown): "
        f"p50 {p50:.2f} ms, p95 {p95:.2f} ms, p99 {p99:.2f} ms, max {lat.max():.2f} ms; "
        f"errors {errors}, degraded {degraded}\nservice-side stage medians (ms): {medians}"
    )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
