"""The Api built without Ray, as the in-process floor serves it: settings from a serve config, real models on the
slice bundle, real Redis and Feast, over HTTP (httpx's ASGI transport)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from models.errors import ConfigError
from pipeline.edge.api import build_api
from pipeline.serve.args import AppArgs
from pipeline.serve.local import make_api, settings_from_config
from settings import PROJECT_ROOT

pytestmark = pytest.mark.integration


def test_settings_come_from_the_serve_configs_args_and_ingress_user_config():
    colocated = settings_from_config(PROJECT_ROOT / "deploy" / "serve_config.yaml")
    assert colocated.topology == "colocated" and colocated.bundle is None  # artifacts/LATEST, resolved at start
    assert colocated.knobs.deadline_ms == 80 and colocated.knobs.max_in_flight == 48
    distributed = settings_from_config(PROJECT_ROOT / "deploy" / "serve_config.distributed.yaml")
    assert distributed.topology == "colocated" and distributed.knobs.deadline_ms == 120  # its knobs, run inline


def test_a_file_that_is_not_a_serve_config_is_refused_by_name(tmp_path: Path):
    bad = tmp_path / "x.yaml"
    bad.write_text("hello: [")
    with pytest.raises(ConfigError, match="not a serve config"):
        settings_from_config(bad)


def test_the_floor_serves_the_same_api_in_one_process(small_bundle, slice_online, store_settings):
    api = make_api(AppArgs(bundle=small_bundle, store=store_settings))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_api(lambda: api)), base_url="http://floor")

    async def go() -> list[httpx.Response]:
        return [
            await client.get("/readyz"),
            await client.post("/recommend", json={"user_id": "floor-new-user", "k": 7}),
        ]

    ready, rec = asyncio.run(go())
    assert ready.status_code == 200 and ready.json()["model_version"] == "slice-v1"
    assert rec.status_code == 200 and len(rec.json()["items"]) == 7 and not rec.json()["degraded"]
