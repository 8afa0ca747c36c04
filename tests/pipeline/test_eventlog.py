"""Redis persistence, on Redis servers of this module's own (ports 6393 and 6394, in tmp dirs). The shared Redis on
6379 is never touched here."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pipeline.store import persistence

pytestmark = pytest.mark.integration

PORT = 6393  # this module's own append-only Redis
SPARE_PORT = 6394  # throwaway Redis servers for the persistence report


def _client(port: int) -> redis.Redis:
    # No retries: redis-py would retry a SHUTDOWN (whose answer is a closed connection) with seconds of backoff.
    return redis.Redis(port=port, socket_timeout=5, retry=Retry(NoBackoff(), 0))


def _port_taken(port: int) -> bool:
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
        return _client(self.port)

    def start(self) -> None:
        if _port_taken(self.port):
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
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory) -> OwnRedis:
    server = OwnRedis(PORT, tmp_path_factory.mktemp("redis-6393"))
    server.start()
    yield server
    server.stop()


# -- what the project's Redis keeps --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (("--appendonly", "no", "--save", ""), "none"),
        (("--appendonly", "no", "--save", "3600 1"), "rdb"),
        (("--appendonly", "yes", "--appendfsync", "always", "--save", ""), "aof(always)"),
        (("--save", "", "--rename-command", "CONFIG", ""), "unknown"),
    ],
)
def test_persistence_says_how_redis_keeps_its_data(tmp_path, extra, expected):
    server = OwnRedis(SPARE_PORT, tmp_path, extra)
    server.start()
    try:
        assert persistence(server.client()) == expected
    finally:
        server.stop()


def test_the_drill_redis_runs_append_only_everysec(own_redis):
    assert persistence(own_redis.client()) == "aof(everysec)"


def test_ensure_redis_starts_an_append_only_redis_in_the_given_dir(tmp_path):
    if _port_taken(SPARE_PORT):
        pytest.fail(f"port {SPARE_PORT} is taken: this test starts a Redis of its own there; free the port")
    script = Path(__file__).resolve().parents[2] / "deploy" / "ensure-redis.sh"
    env = {"PATH": os.environ["PATH"], "REDIS_PORT": str(SPARE_PORT), "RECSERVE_REDIS_DIR": str(tmp_path)}
    out = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=30)
    client = _client(SPARE_PORT)
    try:
        assert out.returncode == 0, out.stderr
        assert persistence(client) == "aof(everysec)"
        assert client.config_get("dir")["dir"] == str(tmp_path) and client.config_get("save")["save"] == ""
    finally:
        pid = int(client.info("server")["process_id"])  # the daemon this test started
        client.shutdown()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert (tmp_path / "appendonlydir").is_dir()
