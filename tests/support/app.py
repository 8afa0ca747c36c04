"""The end-to-end tests' app: a serve config of the project's, pointed at a test's bundle, store and HTTP port, and
`recserve serve` run on it as a user runs it, with every Ray, Serve and HAProxy port and folder of the test's own
(settings.ServeSettings through RECSERVE_* variables), so that a running demo and the tests never meet."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from settings import ServeSettings, StoreSettings
from tests.conftest import ROOT


def settings_env(settings: ServeSettings) -> dict[str, str]:
    """The RECSERVE_* variables that give `recserve serve` these ports and folders."""
    return {f"RECSERVE_{k.upper()}": str(v) for k, v in settings.model_dump().items()}


def serve_config(name: str, http_port: int, bundle: str | Path, store: StoreSettings) -> dict[str, Any]:
    """deploy/<name> with the test's HTTP port, bundle (a directory or a URI) and feature store."""
    config = yaml.safe_load((ROOT / "deploy" / name).read_text())
    config["http_options"]["port"] = http_port
    config["applications"][0]["args"].update(
        bundle=str(bundle),
        store={
            "redis": store.redis,
            "project": store.project,
            "registry": str(store.registry),
            "event_log_dir": str(store.event_log_dir),
        },
    )
    return config


@dataclass(frozen=True)
class Served:
    url: str  # the client URL `recserve serve` printed: HAProxy on the config's port
    up_s: float  # seconds from the command's start to "recserve is up"
    log: Path
    proc: subprocess.Popen


@contextmanager
def serving(config: dict[str, Any], tmp: Path, env: dict[str, str], timeout_s: float = 400) -> Iterator[Served]:
    """`recserve serve --config` on `config` (written under `tmp`) with `env` over this process's environment; up
    when it says so, stopped with SIGTERM (its own shutdown of exactly what it started) on the way out."""
    path = tmp / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp / "serve.log"
    full = {**os.environ, **env}
    if "RAY_ADDRESS" not in env:
        full.pop("RAY_ADDRESS", None)  # a Ray of its own, never one found in the environment
    began = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.commands.cli", "serve", "--config", str(path)],
            cwd=ROOT,
            env=full,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        while "recserve is up" not in (text := log.read_text()):
            if proc.poll() is not None or time.monotonic() - began > timeout_s:
                pytest.fail(f"recserve serve did not come up:\n{text[-4000:]}")
            time.sleep(1)
        url = re.search(r"^HTTP: (http://127\.0\.0\.1:\d+) \(HAProxy over", text, re.M)
        assert url and url[1] == f"http://127.0.0.1:{config['http_options']['port']}", text[-2000:]
        yield Served(url[1], time.monotonic() - began, log, proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(180)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
