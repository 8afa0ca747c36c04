"""A redis-server of a test's own: its own port and dir, started and stopped through the pid the test holds."""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.support import stop_process


def client_for(port: int) -> redis.Redis:
    # No retries: redis-py would retry a SHUTDOWN (whose answer is a closed connection) with seconds of backoff.
    return redis.Redis(port=port, socket_timeout=5, retry=Retry(NoBackoff(), 0))


def port_taken(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class OwnRedis:
    """A redis-server this test started, on its own port and dir; stopped only through the pid it holds."""

    port: int
    dir: Path
    extra: tuple[str, ...] = ("--appendonly", "yes", "--appendfsync", "everysec", "--save", "")
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def command(self) -> list[str]:
        base = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        return [*base, *self.extra]

    def client(self) -> redis.Redis:
        return client_for(self.port)

    def start(self) -> None:
        if port_taken(self.port):
            pytest.fail(f"port {self.port} is taken: this test starts a Redis of its own there; free the port")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return
            except redis.exceptions.ConnectionError:  # refused, or still loading its AOF
                time.sleep(0.02)
        pytest.fail(f"redis-server on port {self.port} did not answer within 10 s")

    def shutdown(self) -> None:
        """SHUTDOWN, as an operator's restart does: Redis fsyncs its AOF and exits."""
        assert self.proc is not None
        self.client().shutdown()
        self.proc.wait(10)

    def stop(self) -> None:
        stop_process(self.proc)
