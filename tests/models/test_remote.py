"""Bundles by URI against a real S3 API server (moto's server mode): publish, fetch into a node-local cache,
verification, tampering, concurrent fetches and partial downloads."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest

from models.bundle import MANIFEST_FILE, verified
from models.errors import BundleIntegrityError, BundleNotFoundError, BundleStoreError, ConfigError
from models.remote import is_uri, join, localize, publish, remote_manifest


@pytest.fixture
def published(small_bundle: Path, s3, s3_env, tmp_path: Path) -> str:
    bucket = s3.bucket("bundles")
    prefix = join(bucket, tmp_path.name)  # a prefix per test: tests never share objects
    return publish(small_bundle, prefix)


def _key(uri: str, name: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key.rstrip("/") + "/" + name


def test_is_uri() -> None:
    assert is_uri("s3://b/p/v1/")
    assert not is_uri("/tmp/artifacts/v1") and not is_uri("artifacts/v1") and not is_uri("file:///tmp/x")


def test_publish_then_fetch_gives_the_same_verified_bundle(published: str, small_bundle: Path, tmp_path: Path):
    assert published.endswith("/slice-v1/")
    local = localize(published, tmp_path / "cache")
    _, manifest, _ = verified(local)  # every file's hash and the feature schema
    assert manifest.version == "slice-v1"
    assert sorted(p.name for p in local.iterdir()) == sorted(p.name for p in small_bundle.iterdir() if p.is_file())
    assert (local / MANIFEST_FILE).read_bytes() == (small_bundle / MANIFEST_FILE).read_bytes()
    # A second fetch reuses the node's copy (same folder), and leaves no temp folder behind.
    assert localize(published, tmp_path / "cache") == local
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()] == [local.name]


def test_publishing_again_is_a_no_op_and_another_bundle_under_a_version_is_refused(
    published: str, small_bundle: Path, tmp_path: Path
) -> None:
    assert publish(small_bundle, published) == published  # the bundle's own URI, and the same content
    altered = tmp_path / "altered"
    shutil.copytree(small_bundle, altered)
    manifest = json.loads((altered / MANIFEST_FILE).read_text())
    manifest["created_at"] = "another time"
    (altered / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="versions are immutable"):
        publish(altered, published)


def test_a_tampered_object_is_refused_naming_it(published: str, s3, tmp_path: Path) -> None:
    manifest = json.loads((remote_manifest(published))[0])
    name = sorted(manifest["files"])[0]
    bucket, key = _key(published, name)
    s3.client().put_object(Bucket=bucket, Key=key, Body=b"not the model you trained")
    cache = tmp_path / "cache"
    with pytest.raises(BundleIntegrityError, match=f"bundle object {published}{name} was altered"):
        localize(published, cache)
    # Nothing half-fetched is left where a reader would take it.
    assert not [p for p in cache.iterdir() if p.is_dir()]


def test_a_missing_object_is_refused_naming_it(published: str, s3, tmp_path: Path) -> None:
    manifest = json.loads((remote_manifest(published))[0])
    name = sorted(manifest["files"])[-1]
    bucket, key = _key(published, name)
    s3.client().delete_object(Bucket=bucket, Key=key)
    with pytest.raises(BundleIntegrityError, match=f"{published}{name} is missing"):
        localize(published, tmp_path / "cache")


def test_a_publish_under_way_shows_no_bundle(small_bundle: Path, s3, s3_env, tmp_path: Path) -> None:
    # The files are there but the manifest, written last, is not yet: readers see no bundle, not half of one.
    uri = join(s3.bucket("bundles"), tmp_path.name, "slice-v1")
    bucket, _ = _key(uri, "")
    for f in small_bundle.iterdir():
        if f.is_file() and f.name != MANIFEST_FILE:
            s3.client().put_object(Bucket=bucket, Key=_key(uri, f.name)[1], Body=f.read_bytes())
    with pytest.raises(BundleNotFoundError, match="manifest is written last"):
        localize(uri, tmp_path / "cache")


def test_a_partial_download_is_never_used(published: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    good = localize(published, cache)
    # A fetch killed halfway leaves a temp folder: the next fetch removes it and never reads from it.
    shutil.rmtree(good)
    partial = cache / f".tmp-{good.name}-killed"
    partial.mkdir()
    (partial / "cf.npz").write_bytes(b"trunc")
    again = localize(published, cache)
    assert again == good and not partial.exists()
    verified(again)


def test_an_altered_cached_copy_is_fetched_anew(published: str, tmp_path: Path) -> None:
    local = localize(published, tmp_path / "cache")
    victim = next(p for p in local.iterdir() if p.name != MANIFEST_FILE)
    victim.write_bytes(b"bit rot")
    again = localize(published, tmp_path / "cache")
    assert again == local
    verified(again)


def _fetch(uri: str, cache: str, env: dict[str, str], out: multiprocessing.Queue) -> None:
    os.environ.update(env)
    try:
        out.put(str(localize(uri, Path(cache))))
    except Exception as exc:
        out.put(f"error: {exc!r}")


def test_concurrent_fetches_on_one_node_share_one_copy(published: str, s3_env, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_fetch, args=(published, str(tmp_path / "cache"), s3_env, out)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert len(set(results)) == 1, results
    local = Path(results[0])
    verified(local)
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()] == [local.name]


def test_an_unreachable_store_names_the_fix(small_bundle: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing answers
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    with pytest.raises(BundleStoreError, match="AWS_ENDPOINT_URL"):
        localize("s3://bundles/nowhere/v1/", tmp_path / "cache")


def test_a_local_path_is_used_as_it_is(small_bundle: Path, tmp_path: Path) -> None:
    assert localize(str(small_bundle), tmp_path / "cache") == small_bundle
    assert not (tmp_path / "cache").exists()
