"""A real Prometheus (Debian's `prometheus` package, which also ships `promtool`) for tests: started on a free
loopback port with a config of the test's own in a temp dir, stopped by the test that started it.

Where the binaries are missing a test skips saying how to install them, except in CI (CI=true), where .ci/run
installs them, so their absence there is a failure."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support import stop_process


def binary(name: str) -> str:
    """The path of `name` (prometheus, promtool); skips the test outside CI, fails it in CI, when it is missing."""
    found = shutil.which(name)
    if found:
        return found
    why = f"{name} is not installed: `apt-get install -y prometheus` (.ci/run does)"
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """Prometheus's HTTP API at `url`: instant queries and the targets' health."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=30)

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """The result of an instant query (at `at`, Unix seconds; now if None); raises on a PromQL error."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        body = self.http.get("/api/v1/query", params=params).json()
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def targets(self) -> list[dict[str, Any]]:
        return self.http.get("/api/v1/targets").json()["data"]["activeTargets"]

    def rules(self) -> list[dict[str, Any]]:
        return [r for g in self.http.get("/api/v1/rules").json()["data"]["groups"] for r in g["rules"]]


@contextmanager
def running(config: dict[str, Any], workdir: Path, files: dict[str, Path] | None = None) -> Iterator[Prometheus]:
    """Prometheus with `config` (its files, e.g. rule files, copied beside it from `files`), data in `workdir`."""
    for name, source in (files or {}).items():
        shutil.copy(source, workdir / name)
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = (workdir / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary("prometheus"),
            f"--config.file={path}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    began = time.monotonic()
    while True:
        try:
            if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() - began > 60:
            proc.kill()
            raise AssertionError(f"prometheus did not start:\n{(workdir / 'prometheus.log').read_text()[-3000:]}")
        time.sleep(0.2)
    try:
        yield Prometheus(url)
    finally:
        stop_process(proc, 30)
        log.close()
