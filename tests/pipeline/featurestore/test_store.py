"""The feature store against the real Redis and Feast: definitions, materialization, the read path."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pandas as pd
import pytest

from feature_repo import definitions as defs
from models.errors import NotMaterializedError, StoreUnavailableError
from models.features import FEATURES, ITEM_FEATURES, USER_NUMERIC_FEATURES
from pipeline.featurestore.events import EventSettings, EventWriter, validate_events
from pipeline.featurestore.store import (
    OnlineFeatures,
    apply,
    materialize,
    read_user_via_feast,
    require_redis,
)
from settings import StoreSettings
from tests.pipeline.conftest import catalog, manifest

pytestmark = pytest.mark.integration


def test_definitions_come_from_the_one_feature_list(feature_store, small_bundle):
    apply(feature_store, small_bundle)
    apply(feature_store, small_bundle)  # idempotent
    views = {v.name: v for v in feature_store.list_feature_views()}
    assert set(views) == {defs.USER_BATCH, defs.ITEM_BATCH, defs.USER_REALTIME}
    for view, group in ((defs.USER_BATCH, "user"), (defs.ITEM_BATCH, "item"), (defs.USER_REALTIME, "realtime")):
        assert [f.name for f in views[view].features] == [f.name for f in FEATURES if f.group == group]
    assert views[defs.USER_BATCH].batch_source.path == str(small_bundle.resolve() / "user_features.parquet")
    blender = feature_store.get_feature_service(defs.BLENDER_SERVICE)
    names = [f.name for p in blender.feature_view_projections for f in p.features]
    assert names == [*USER_NUMERIC_FEATURES, *ITEM_FEATURES]
    assert {p.name for p in feature_store.get_feature_service(defs.INGRESS_SERVICE).feature_view_projections} == {
        defs.USER_BATCH,
        defs.USER_REALTIME,
    }


def _same(a, b) -> None:
    assert a.user_id == b.user_id and a.known == b.known and a.country == b.country
    np.testing.assert_array_equal(a.numeric, b.numeric)  # NaNs in the same places
    assert a.realtime == b.realtime


def test_fast_read_returns_what_feast_returns(slice_online, feature_store, store_settings, small_bundle):
    users = pd.read_parquet(small_bundle / "user_features.parquet")["user_id"].sample(40, random_state=1).tolist()
    writer = EventWriter(feature_store, store_settings, EventSettings())
    items = catalog(small_bundle)
    active = [*users[:5], "brand-new-user"]
    for i, u in enumerate(active):
        raw = [{"user_id": u, "item_id": items[j], "event_type": "view"} for j in range(i + 1)]
        writer.write(validate_events(raw, frozenset(items), writer.settings))
    for u in [*users, *active, "never-seen"]:
        _same(slice_online.user(u), read_user_via_feast(feature_store, "slice-v1", u))
    assert slice_online.user(users[4]).realtime.event_count == 5


def test_item_features_held_in_memory_equal_the_bundle(slice_online, small_bundle):
    frame = pd.read_parquet(small_bundle / "item_features.parquet").set_index("item_id")
    expected = frame.loc[slice_online.item_ids, list(ITEM_FEATURES)].to_numpy(dtype=np.float32)
    np.testing.assert_array_equal(slice_online.item_matrix, expected)
    assert slice_online.item_ids.tolist() == catalog(small_bundle)


def test_one_read_gives_user_and_candidate_features_in_schema_order(slice_online, small_bundle):
    users = pd.read_parquet(small_bundle / "user_features.parquet").set_index("user_id")
    u = users.index[3]
    items = np.array([5, 0, 42])
    got = slice_online.read(u, items)
    assert got.user.known
    np.testing.assert_allclose(got.user.numeric, users.loc[u, list(USER_NUMERIC_FEATURES)].to_numpy(np.float32))
    assert got.user.country == users.loc[u, "user_country"]
    np.testing.assert_array_equal(got.item_features, slice_online.item_matrix[items])
    with pytest.raises(ValueError, match="at most 500"):
        slice_online.read(u, np.zeros(501, dtype=np.int64))


def test_an_unknown_user_gets_the_declared_defaults(slice_online):
    got = slice_online.user("not-a-customer")
    assert not got.known and got.country == ""
    defaults = {f.name: f.default for f in FEATURES}
    for name, value in zip(USER_NUMERIC_FEATURES, got.numeric, strict=True):
        assert value == defaults[name] or (np.isnan(value) and np.isnan(defaults[name]))
    assert got.realtime.event_count == 0 and got.realtime.events == ()


def test_a_second_bundle_coexists_with_the_live_one(
    slice_online, feature_store, store_settings, small_bundle, tmp_path
):
    # A stand-in for a retrained bundle: same files, another version, every user's spend doubled.
    second = tmp_path / "slice-v2"
    shutil.copytree(small_bundle, second)
    users = pd.read_parquet(second / "user_features.parquet")
    users["bundle_version"] = "slice-v2"
    users["user_total_spend"] *= 2
    users.to_parquet(second / "user_features.parquet", index=False)
    items = pd.read_parquet(second / "item_features.parquet")
    items["bundle_version"] = "slice-v2"
    items.to_parquet(second / "item_features.parquet", index=False)
    u = users["user_id"].iloc[7]
    before = slice_online.user(u)

    materialize(
        feature_store, store_settings, second, manifest(small_bundle).model_copy(update={"version": "slice-v2"})
    )
    live = slice_online.user(u)
    _same(live, before)
    v2 = OnlineFeatures.load(store_settings, "slice-v2", catalog(second)).user(u)
    spend = USER_NUMERIC_FEATURES.index("user_total_spend")
    assert v2.numeric[spend] == pytest.approx(2 * live.numeric[spend], rel=1e-6)
    # Materializing the first bundle again is a no-op: same rows, nothing else disturbed.
    materialize(feature_store, store_settings, small_bundle, manifest(small_bundle))
    _same(slice_online.user(u), before)


def test_a_bundle_never_materialized_is_refused_with_the_command(slice_online, store_settings, small_bundle):
    with pytest.raises(NotMaterializedError, match="recserve features materialize --bundle"):
        OnlineFeatures.load(store_settings, "never-materialized", catalog(small_bundle))


def test_no_redis_fails_fast_and_says_how_to_start_one():
    settings = StoreSettings(redis="127.0.0.1:1", project="unreachable")
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match=r"deploy/ensure-redis\.sh") as info:
        require_redis(settings)
    assert time.monotonic() - started < 5
    assert "127.0.0.1:1" in str(info.value)


def test_online_batch_features_equal_a_recomputation_from_the_raw_data(
    full_bundle, real_data, feature_store, store_settings
):
    """For 50 customers and 50 items, every batch feature in Redis equals plain pandas over the cleaned rows."""
    m = manifest(full_bundle.path)
    materialize(feature_store, store_settings, full_bundle.path, m)
    online = OnlineFeatures.load(store_settings, "full", catalog(full_bundle.path))
    cutoff = m.cutoff
    day = pd.Timedelta(days=1)

    inter = real_data.interactions
    inter = inter[inter["ts"] < cutoff]
    rng = np.random.default_rng(7)
    for user in rng.choice(np.sort(inter["user_id"].unique()), size=50, replace=False):
        rows = inter[inter["user_id"] == user]
        baskets = [g["item_id"].nunique() for _, g in rows.groupby("invoice", observed=True)]
        by_country = rows["country"].value_counts()
        expected = {
            "user_recency_days": (cutoff - rows["ts"].max()) / day,
            "user_order_count": rows["invoice"].nunique(),
            "user_total_spend": float((rows["quantity"] * rows["price"]).sum()),
            "user_distinct_items": rows["item_id"].nunique(),
            "user_avg_basket_size": sum(baskets) / len(baskets),
            "user_tenure_days": (cutoff - rows["ts"].min()) / day,
        }
        got = online.user(str(user))
        assert got.known
        for name, value in zip(USER_NUMERIC_FEATURES, got.numeric, strict=True):
            assert value == pytest.approx(expected[name], rel=1e-5, abs=1e-4), (user, name)
        assert got.country == min(by_country[by_country == by_country.max()].index), user

    sales = real_data.sales
    sales = sales[sales["ts"] < cutoff]
    for item in rng.choice(online.item_ids, size=50, replace=False):
        rows = sales[sales["item_id"] == item]
        expected = {
            **{f"item_pop_{d}d": rows.loc[rows["ts"] >= cutoff - d * day, "invoice"].nunique() for d in (7, 30, 90)},
            "item_buyers": rows["user_id"].dropna().nunique(),
            "item_avg_price": rows["price"].mean(),
            "item_days_since_first_sale": (cutoff - rows["ts"].min()) / day,
            "item_days_since_last_sale": (cutoff - rows["ts"].max()) / day,
        }
        got = online.item_matrix[online.item_index[item]]
        for name, value in zip(ITEM_FEATURES, got, strict=True):
            assert value == pytest.approx(expected[name], rel=1e-5, abs=1e-4), (item, name)
