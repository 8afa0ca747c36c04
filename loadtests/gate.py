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
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests.systems import BIN, ROOT, SYSTEMS, locust_step, running
from models.errors import BundleNotFoundError
from settings import Settings

RUNS = (("colocated", 20.0, 60.0), ("distributed", 10.0, 30.0))
QUIET_PCT = 25.0  # the machine's CPU use (all cores, %) under which a run starts
QUIET_WAIT_S = 120.0


def busiest(n: int = 5) -> str:
    """The `n` processes using the most CPU over the last second: pid, name, % of one core."""
    procs = list(psutil.process_iter(["pid", "name"]))
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            continue
    time.sleep(1.0)
    use = []
    for p in procs:
        try:
            use.append((p.cpu_percent(None), p.info["pid"], p.info["name"]))
        except psutil.Error:
            continue
    return ", ".join(f"{name}[{pid}] {pct:.0f}%" for pct, pid, name in sorted(use, reverse=True)[:n])


def wait_quiet(label: str) -> None:
    """Start a run on a quiet machine: up to QUIET_WAIT_S for what the previous step left running (a Ray shutting
    down, the page cache being reclaimed after the test suite) to finish. Prints what it saw, and who was busy
    when the machine stayed busy: the gate still runs, and its figures are read with that line."""
    began = time.monotonic()
    while (busy := psutil.cpu_percent(interval=3.0)) > QUIET_PCT and time.monotonic() - began < QUIET_WAIT_S:
        pass
    waited = time.monotonic() - began
    line = f"[{label}] machine {busy:.0f}% busy before the run (waited {waited:.0f} s for <= {QUIET_PCT:g}%)"
    if busy > QUIET_PCT:
        line += f"; busiest: {busiest()}"
    print(line, flush=True)


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
            wait_quiet(name)
            psutil.cpu_times_percent(None)  # the run's shares are since this call
            step = locust_step(
                url, rate, seconds, args.reports / name, "--p99-ms", f"{args.p99_ms:g}", rate_per_user=1.0
            )
            # Busy and stolen shares of all cores over the run. Steal is time the hypervisor gave another guest
            # while this one wanted to run: a run with much of it measured a slower machine, not the code.
            shares = psutil.cpu_times_percent(None)
            busy, steal = 100 - shares.idle - getattr(shares, "iowait", 0.0), getattr(shares, "steal", 0.0)
        print(
            f"[{name}, {rate:g} req/s for {seconds:g} s at {url}] {step.line}; machine {busy:.0f}% busy, "
            f"{steal:.1f}% stolen by the hypervisor",
            flush=True,
        )
        if not step.passed:
            failed.append(name)
    if failed:
        print(f"SLO gate failed for: {', '.join(failed)}; reports in {args.reports}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
