"""Feature-store fixtures: a Feast project of the session's own on the real Redis, dropped afterwards."""

from __future__ import annotations

import uuid
from pathlib import Path

import pandas as pd
import pytest

from models.bundle import Manifest, read_manifest
from pipeline.featurestore.store import OnlineFeatures, drop_project, materialize, open_store
from settings import StoreSettings


def scratch_settings(registry_dir: Path) -> StoreSettings:
    # The project name suffixes every Redis key, so these tests never touch the demo's rows.
    return StoreSettings(
        project=f"test_{uuid.uuid4().hex[:12]}",
        registry=registry_dir / "registry.db",
        event_log_dir=registry_dir / "event_log",
    )


@pytest.fixture(scope="session")
def store_settings(tmp_path_factory) -> StoreSettings:
    return scratch_settings(tmp_path_factory.mktemp("feast"))


@pytest.fixture(scope="session")
def feature_store(store_settings):
    store = open_store(store_settings)
    yield store
    drop_project(store, store_settings)


def manifest(bundle: Path) -> Manifest:
    return read_manifest(bundle)


def catalog(bundle: Path) -> list[str]:
    return pd.read_parquet(bundle / "catalog.parquet")["item_id"].tolist()


@pytest.fixture(scope="session")
def slice_online(feature_store, store_settings, small_bundle) -> OnlineFeatures:
    materialize(feature_store, store_settings, small_bundle, manifest(small_bundle))
    return OnlineFeatures.load(store_settings, "slice-v1", catalog(small_bundle))


@pytest.fixture(scope="session")
def second_online(feature_store, store_settings, second_bundle) -> OnlineFeatures:
    materialize(feature_store, store_settings, second_bundle, manifest(second_bundle))
    return OnlineFeatures.load(store_settings, "slice-v2", catalog(second_bundle))
