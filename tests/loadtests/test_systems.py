"""The load tests' harness gives the services it starts a key of the run's own, and its clients that key."""

from __future__ import annotations

from loadtests.systems import key_env
from pipeline.edge.auth import KeyRing
from settings import AuthSettings


def test_the_run_key_is_one_the_started_service_accepts(tmp_path):
    env = key_env()
    ring = KeyRing(AuthSettings(api_keys=env["RECSERVE_API_KEYS"], api_keys_file=tmp_path / "none"))
    assert ring.authorize(f"Bearer {env['RECSERVE_API_KEY']}", "events:write", "POST /events").name == "loadtest"
    assert env["RECSERVE_API_KEY"] not in env["RECSERVE_API_KEYS"]  # the service gets the digest only
