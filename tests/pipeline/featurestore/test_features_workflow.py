"""The feature store end to end, as an operator runs it: apply, materialize (twice), push, read, check."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pandas as pd
import pytest

from pipeline.featurestore.events import EventSettings, EventWriter, validate_events
from pipeline.featurestore.store import (
    OnlineFeatures,
    drop_project,
    open_store,
    read_user_via_feast,
    redis_client,
)
from settings import StoreSettings
from tests.conftest import recserve
from tests.pipeline.conftest import catalog

pytestmark = pytest.mark.integration


def test_apply_materialize_push_read_and_check(small_bundle, tmp_path):
    project = f"wf_{uuid.uuid4().hex[:10]}"
    env = {"RECSERVE_FEAST_PROJECT": project, "RECSERVE_FEAST_REGISTRY": str(tmp_path / "registry.db")}
    settings = StoreSettings(project=project, registry=tmp_path / "registry.db")
    try:
        out = recserve("features", "apply", "--bundle", str(small_bundle), env=env)
        assert out.returncode == 0, out.stderr
        assert "applied FeatureService ingress_v1" in out.stdout
        for _ in range(2):  # idempotent
            out = recserve("features", "materialize", "--bundle", str(small_bundle), env=env)
            assert out.returncode == 0, out.stderr
        assert f"materialized bundle slice-v1 into project {project}" in out.stdout

        items = catalog(small_bundle)
        online = OnlineFeatures.load(settings, "slice-v1", items)
        store = open_store(settings)
        writer = EventWriter(store, settings, EventSettings())
        user = pd.read_parquet(small_bundle / "user_features.parquet")["user_id"].iloc[0]
        before = online.user(user)
        assert before.known and before.realtime.event_count == 0

        raw = [
            {"user_id": user, "item_id": items[1], "event_type": "view"},
            {"user_id": user, "item_id": items[2], "event_type": "purchase"},
        ]
        assert writer.write(validate_events(raw, set(items), writer.settings)).accepted == 2
        after = online.user(user)
        np.testing.assert_array_equal(after.numeric, before.numeric)
        assert [e.item_id for e in after.realtime.recent(2)] == [items[2], items[1]]
        assert after.realtime.counts(after.realtime.last_event_ts_ms)["1h"] == {
            "view": 1,
            "add_to_cart": 0,
            "purchase": 1,
        }
        via_feast = read_user_via_feast(store, "slice-v1", user)
        assert via_feast.realtime == after.realtime and via_feast.country == after.country
    finally:
        drop_project(open_store(settings), settings)
    assert not list(redis_client(settings).scan_iter(match=f"*{project}*"))  # cleaned up after itself


def test_without_redis_the_command_fails_fast_and_says_how_to_start_one(small_bundle, tmp_path):
    started = time.monotonic()
    out = recserve(
        "features",
        "materialize",
        "--bundle",
        str(small_bundle),
        env={"RECSERVE_REDIS": "127.0.0.1:1", "RECSERVE_FEAST_REGISTRY": str(tmp_path / "r.db")},
    )
    assert time.monotonic() - started < 60
    assert out.returncode == 2
    assert "Redis at 127.0.0.1:1 does not answer" in out.stderr and "deploy/ensure-redis.sh" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_bad_project_name_is_refused_naming_the_setting(small_bundle):
    out = recserve("features", "apply", "--bundle", str(small_bundle), "--project", "no spaces")
    assert out.returncode == 2 and "feature store setting 'project'" in out.stderr
