"""CPU priority for starting replicas: a replica that starts (or restarts) while others serve on the same node
loads its libraries and models without taking their CPU. On 2 cores, a restarting replica otherwise stalled the
one still serving for about a second (p50 275-532 ms, about 50 requests shed) and pushed the distributed app's
p99 past its deadline when a model replica was replaced.

`start_low` is the serve configs' `worker_process_setup_hook`: it runs in each replica's process before the
deployment's module (torch, Feast, the models) is imported. `low_priority()` wraps a replica's `__init__` and puts
the priority back once the replica is warm. Imports nothing heavy, on purpose.
"""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Iterator
from contextlib import contextmanager

NICENESS = 10
_original: dict[str, int] = {}


def _can_restore(value: int) -> bool:
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    return os.geteuid() == 0 or 20 - soft <= value


def _set_all(value: int) -> None:
    # Linux keeps a priority per thread: set every thread of the process.
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, int(tid), value)


def start_low() -> None:
    """Lower this process's priority by NICENESS, where it can be raised back later (root, or RLIMIT_NICE)."""
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if "value" not in _original and _can_restore(current):
        _original["value"] = current
        _set_all(min(current + NICENESS, 19))


@contextmanager
def low_priority() -> Iterator[None]:
    """Run the block at low priority (if `start_low` has not already lowered it) and leave the process at its
    original priority afterwards. Where the priority could not be raised back, the block runs as it is."""
    start_low()
    try:
        yield
    finally:
        if "value" in _original:
            _set_all(_original.pop("value"))
