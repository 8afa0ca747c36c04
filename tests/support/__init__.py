"""Helpers the tests share: servers of a test's own (Redis, S3, Prometheus, Ray), started and stopped by the pid the
test holds."""

from __future__ import annotations

import subprocess


def stop_process(proc: subprocess.Popen | None, grace_s: float = 10) -> None:
    """SIGTERM the process the caller started, SIGKILL it after `grace_s` seconds, and reap it."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
