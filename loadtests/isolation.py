"""CI's isolation check: a running recserve, as `make demo` leaves it, survives a test run on the same machine.

    python loadtests/isolation.py [--log reports/isolation/demo.log] -- make test

It trains a bundle when there is none and materializes it (as the SLO gate does), starts `recserve serve` with
every default (the demo's ports: Ray 6380, HAProxy 8000, metrics 8080), and records what it answers. Then it
runs the command; the end-to-end tier in it starts a Ray, Serve and HAProxy of its own, on its own ports. After
the command the first instance must still answer `/readyz` and `/recommend` with the same bundle. Exit status:
the command's, or 1 when the demo did not survive it. The demo is stopped afterwards, by its pid.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests.gate import prepare
from loadtests.systems import ROOT, SYSTEMS, running
from pipeline.commands.serve import http_get


def recommend(url: str) -> tuple[int, dict]:
    body = json.dumps({"user_id": "12347", "k": 5}).encode()
    req = urllib.request.Request(f"{url}/recommend", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except OSError as exc:
        return 0, {"error": str(exc)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--log", type=Path, default=ROOT / "reports" / "isolation" / "demo.log")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run beside the demo")
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command to run beside the demo, after --")
    prepare()
    with running(SYSTEMS["colocated"], args.log) as url:
        code, before = recommend(url)
        if code != 200:
            print(f"isolation: the demo at {url} does not answer /recommend ({code}): {before}", flush=True)
            return 1
        version = before["model_version"]
        print(f"isolation: demo up at {url} (bundle {version}); running {' '.join(command)}", flush=True)
        rc = subprocess.run(command, cwd=ROOT).returncode
        ready, _ = http_get(f"{url}/readyz", 10)
        code, after = recommend(url)
        survived = ready == 200 and code == 200 and after.get("model_version") == version
        print(
            f"isolation: the command exited {rc}; afterwards the demo answered /readyz {ready} and /recommend {code} "
            f"(bundle {after.get('model_version')}): {'it survived' if survived else 'IT DID NOT SURVIVE'}",
            flush=True,
        )
    return rc if survived else 1


if __name__ == "__main__":
    sys.exit(main())
