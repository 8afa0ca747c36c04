"""An S3 API server of a test's own: moto's server mode (`moto_server`, from `moto[server]`), on a free loopback
port, started and stopped through the pid the test holds. Clients reach it through the standard AWS variables
(`env()`), exactly as they would reach AWS or MinIO: nothing in recserve knows it is moto."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import stop_process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class OwnS3:
    """moto_server on 127.0.0.1:<port>; `env()` is what a client process needs to use it."""

    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "recserve-test",
            "AWS_SECRET_ACCESS_KEY": "recserve-test-secret",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            # Feast's S3 registry store, which otherwise ignores AWS_ENDPOINT_URL in older botocore releases.
            "FEAST_S3_ENDPOINT_URL": self.endpoint,
        }

    def start(self) -> None:
        exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
        if exe is None:
            pytest.fail("moto_server is not installed: `make venv` installs moto[server] from requirements.lock")
        self.proc = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env()},
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.endpoint}/", timeout=1).read()
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if self.proc.poll() is not None:
                    pytest.fail(f"moto_server exited with {self.proc.returncode} before answering")
                time.sleep(0.1)
        pytest.fail(f"moto_server on port {self.port} did not answer within 30 s")

    def client(self):  # a boto3 S3 client, for tests to create buckets and tamper with objects
        import boto3

        e = self.env()
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=e["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=e["AWS_SECRET_ACCESS_KEY"],
            region_name=e["AWS_REGION"],
        )

    def bucket(self, name: str) -> str:
        """Create a bucket (once) and return its s3:// URI."""
        c = self.client()
        if name not in {b["Name"] for b in c.list_buckets().get("Buckets", [])}:
            c.create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self) -> None:
        stop_process(self.proc)
