"""Bundles and the Feast registry by s3:// URI, through the CLI as an operator runs it, against a real S3 API
server (moto's server mode): publish, fetch, materialize from a URI with the registry in S3, and read the same
definitions from another process with a cache of its own (another node)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pandas as pd
import pytest

from models.bundle import verified
from models.remote import remote_manifest
from pipeline.featurestore.store import OnlineFeatures, drop_project, open_store
from settings import StoreSettings
from tests.conftest import recserve
from tests.pipeline.conftest import catalog

pytestmark = pytest.mark.integration


def test_push_fetch_and_materialize_from_s3_with_the_registry_in_s3(small_bundle: Path, s3, s3_env, tmp_path: Path):
    prefix = f"{s3.bucket('bundles')}/{tmp_path.name}"
    project = f"s3_{uuid.uuid4().hex[:10]}"
    registry = f"{prefix}/feast/registry.db"
    env = {
        **s3_env,
        "RECSERVE_FEAST_PROJECT": project,
        "RECSERVE_FEAST_REGISTRY": registry,
        "RECSERVE_BUNDLE_CACHE": str(tmp_path / "node-a"),
    }
    out = recserve("bundle", "push", str(small_bundle), f"{prefix}/", env=env)
    assert out.returncode == 0, out.stderr
    uri = f"{prefix}/slice-v1/"
    assert out.stdout.strip() == f"published bundle slice-v1 to {uri}"

    out = recserve("bundle", "fetch", uri, env=env)
    assert out.returncode == 0, out.stderr
    fetched = Path(out.stdout.strip())
    assert fetched.parent == tmp_path / "node-a"
    verified(fetched)

    try:
        out = recserve("features", "materialize", "--bundle", uri, env=env)
        assert out.returncode == 0, out.stderr
        assert f"materialized bundle slice-v1 into project {project}" in out.stdout
        assert "registry.db" in {k["Key"].rsplit("/", 1)[-1] for k in _objects(s3, prefix)}  # Feast's S3 store

        # Another node: its own cache, the registry from S3; it reads what the first one materialized.
        other = StoreSettings(project=project, registry=registry)
        assert other.registry_is_remote
        items = catalog(small_bundle)
        online = OnlineFeatures.load(other, "slice-v1", items)
        assert open_store(other).get_feature_service("ingress_v1") is not None
        user = pd.read_parquet(small_bundle / "user_features.parquet")["user_id"].iloc[0]
        assert online.user(user).known  # the batch row the first node materialized
    finally:
        settings = StoreSettings(project=project, registry=registry)
        drop_project(open_store(settings), settings)


def test_train_out_s3_publishes_the_bundle_manifest_last(s3, s3_env, tmp_path: Path) -> None:
    prefix = f"{s3.bucket('bundles')}/{tmp_path.name}"
    fast = tmp_path / "fast.json"
    fast.write_text(json.dumps({"cf": {"iterations": 3}, "blender": {"n_estimators": 20}}))
    env = {**s3_env, "RECSERVE_ARTIFACTS": str(tmp_path / "artifacts")}
    out = recserve("train", "--out", f"{prefix}/", "--version", "t1", "--settings", str(fast), "--quiet", env=env)
    assert out.returncode == 0, out.stderr
    assert f"published bundle t1 to {prefix}/t1/" in out.stdout
    raw, manifest = remote_manifest(f"{prefix}/t1/")
    assert raw == (tmp_path / "artifacts" / "t1" / "manifest.json").read_bytes()
    keys = {k["Key"].rsplit("/", 1)[-1] for k in _objects(s3, f"{prefix}/t1")}
    assert keys == {*manifest["files"], "manifest.json"}


def test_a_tampered_bundle_is_refused_by_the_cli_naming_the_object(small_bundle: Path, s3, s3_env, tmp_path: Path):
    prefix = f"{s3.bucket('bundles')}/{tmp_path.name}"
    env = {**s3_env, "RECSERVE_BUNDLE_CACHE": str(tmp_path / "cache")}
    assert recserve("bundle", "push", str(small_bundle), prefix, env=env).returncode == 0
    bucket, _, key = f"{prefix}/slice-v1/cf.npz".removeprefix("s3://").partition("/")
    s3.client().put_object(Bucket=bucket, Key=key, Body=b"tampered")
    out = recserve("bundle", "fetch", f"{prefix}/slice-v1/", env=env)
    assert out.returncode == 2
    assert f"bundle object {prefix}/slice-v1/cf.npz was altered" in out.stderr


def _objects(s3, prefix: str) -> list[dict]:
    bucket, _, key = prefix.removeprefix("s3://").partition("/")
    return s3.client().list_objects_v2(Bucket=bucket, Prefix=key).get("Contents", [])
