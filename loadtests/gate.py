"""CI's SLO gate: start each topology with `recserve serve`, as a user does, offer it the locust traffic mix at a
fixed rate, and fail when p99 exceeds the budget, any request fails or more than 1% are degraded.

    python loadtests/gate.py [--reports reports/gate] [--p99-ms 100]

Default runs: colocated (deploy/serve_config.yaml) 60 s at 20 req/s, then distributed 30 s at 10 req/s. With no
trained bundle it trains one first; it always applies and materializes the features (both idempotent). One
summary line per run, prefixed with the topology; exit 1 when any gate fails.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests.systems import BIN, ROOT, SYSTEMS, locust_step, running
from models.errors import BundleNotFoundError
from settings import Settings

RUNS = (("colocated", 20.0, 60.0), ("distributed", 10.0, 30.0))


def prepare() -> None:
    recserve = str(BIN / "recserve")
    try:
        Settings().latest_bundle()
    except BundleNotFoundError:
        subprocess.run([recserve, "train", "-q"], cwd=ROOT, check=True)
    subprocess.run([recserve, "features", "apply"], cwd=ROOT, check=True, capture_output=True)
    subprocess.run([recserve, "features", "materialize"], cwd=ROOT, check=True, capture_output=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reports", type=Path, default=ROOT / "reports" / "gate", help="CSV and HTML reports")
    p.add_argument("--p99-ms", type=float, default=100.0)
    args = p.parse_args()
    prepare()
    failed = []
    for name, rate, seconds in RUNS:
        system = SYSTEMS[name]
        with running(system, args.reports / f"{name}-server.log") as url:
            step = locust_step(
                url, rate, seconds, args.reports / name, "--p99-ms", f"{args.p99_ms:g}", rate_per_user=1.0
            )
        print(f"[{name}, {rate:g} req/s for {seconds:g} s at {url}] {step.line}", flush=True)
        if not step.passed:
            failed.append(name)
    if failed:
        print(f"SLO gate failed for: {', '.join(failed)}; reports in {args.reports}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
