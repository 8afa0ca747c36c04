"""The live replicas of one Serve deployment, from Ray's own state (the GCS actor table), as JSON lines.

    python -m tests.support.ray_replicas --address 127.0.0.1:6391 --deployment Ingress

Run as a subprocess, so the test process never becomes a Ray driver. Replicas are found by Ray's actor class name
(`ServeReplica:<app>:<deployment>`), never by scanning processes by name.
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", required=True, help="the Ray head's GCS address, host:port")
    p.add_argument("--deployment", required=True)
    p.add_argument("--app", default="recserve")
    args = p.parse_args()
    import ray
    from ray._private import state

    ray.init(address=args.address, logging_level="ERROR", log_to_driver=False, include_dashboard=False)
    wanted = f"ServeReplica:{args.app}:{args.deployment}"
    for actor in state.actors(actor_state_name="ALIVE").values():
        if actor["ActorClassName"] == wanted:
            print(json.dumps({"pid": actor["Pid"], "name": actor["Name"], "restarts": actor["NumRestarts"]}))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
