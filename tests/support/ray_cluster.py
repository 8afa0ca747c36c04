"""A Ray worker node of a test's own, joined to a head with `ray start --address --block`: its own temp dir,
ports and node labels, in a process session of its own, stopped through the pid the test holds (never `ray stop`).

    python -m tests.support.ray_cluster --address 127.0.0.1:6393

prints one JSON line per live replica of the app (deployment, node id, the node's labels), from Ray's GCS state, in
a subprocess, so the test process never becomes a Ray driver.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.commands.serve import _bin, stop_session, wait_node


@dataclass
class WorkerNode:
    """`ray start --address <head> --block` with this node's own temp dir, ports, labels and environment."""

    address: str
    tmp: Path
    labels: dict[str, str]
    env: dict[str, str]
    ports: dict[str, int]  # node_manager, object_manager, metrics, agent_listen, agent_grpc, runtime_env_agent
    worker_ports: str  # lo-hi
    num_cpus: int = 2
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        lo, hi = self.worker_ports.split("-")
        p = self.ports
        cmd = [
            _bin("ray"),
            "start",
            f"--address={self.address}",
            "--block",
            f"--temp-dir={self.tmp}",
            f"--num-cpus={self.num_cpus}",
            "--labels=" + ",".join(f"{k}={v}" for k, v in self.labels.items()),
            f"--node-manager-port={p['node_manager']}",
            f"--object-manager-port={p['object_manager']}",
            f"--metrics-export-port={p['metrics']}",
            f"--dashboard-agent-listen-port={p['agent_listen']}",
            f"--dashboard-agent-grpc-port={p['agent_grpc']}",
            f"--runtime-env-agent-port={p['runtime_env_agent']}",
            f"--min-worker-port={lo}",
            f"--max-worker-port={hi}",
            "--disable-usage-stats",
        ]
        log = self.tmp.parent / f"{self.tmp.name}.log"
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, env={**os.environ, **self.env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_node(self.proc, p["node_manager"], log, "the worker node", 90)

    def stop(self) -> None:
        if self.proc is not None:
            stop_session(self.proc, 40)


def main() -> int:
    p = argparse.ArgumentParser(description="the app's live actors and the labels of the nodes they run on")
    p.add_argument("--address", required=True)
    p.add_argument("--app", default="recserve")
    args = p.parse_args()
    import ray
    from ray._private import state

    # From the GCS's own tables (the node table's labels, the actor table's node ids), which need no dashboard: the
    # test's head runs without one.
    ray.init(address=args.address, logging_level="ERROR", log_to_driver=False, include_dashboard=False)
    labels = {n["NodeID"]: n.get("Labels") or {} for n in ray.nodes() if n.get("Alive")}
    wanted = f"ServeReplica:{args.app}:"
    for actor in state.actors(actor_state_name="ALIVE").values():
        if actor["ActorClassName"].startswith(wanted):
            node = actor["Address"]["NodeID"]
            name = actor["ActorClassName"][len(wanted) :]
            print(json.dumps({"deployment": name, "node_id": node, "labels": labels.get(node, {})}))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
