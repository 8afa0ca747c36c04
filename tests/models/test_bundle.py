from __future__ import annotations

import json
import shutil

import pytest

from models import bundle as bundle_mod
from models.drift import DRIFT_FILE
from models.errors import BundleIntegrityError, BundleNotFoundError, ConfigError, SchemaMismatchError
from tests.conftest import DATA, SLICE_CUTOFF
from training.train import train

pytestmark = pytest.mark.integration

EXPECTED_FILES = {
    DRIFT_FILE,
    "catalog.parquet",
    "item_features.parquet",
    "user_features.parquet",
    "interactions.parquet",
    "cf.npz",
    "embeddings.npz",
    "blender.txt",
    "popularity.parquet",
}


def test_bundle_loads_back(small_bundle):
    b = bundle_mod.load_core(small_bundle)
    m = b.manifest
    assert b.version == "slice-v1" and b.snapshot.as_of == SLICE_CUTOFF
    assert set(m.files) == EXPECTED_FILES and m.cutoff == SLICE_CUTOFF and m.settings.cf.factors == 16
    assert m.data["sha256"] == "dea6ec15718d9dd6bb9bea2d41acd669c3e286a22e958c67039e94e787266a70"
    assert m.feature_schema["hash"] and len(m.feature_schema["features"]) > 20
    for name in ("recall@10", "ndcg@10", "map@10", "coverage@10"):
        assert 0 <= m.metrics["systems"]["blend"][name] <= 1
    assert m.metrics["systems"]["blend"]["users"] > 100
    assert not list(small_bundle.glob("*.pkl"))
    assert len(b.snapshot.item_ids) == len(b.popularity.order) <= 600
    assert (bundle_mod.resolve(None, small_bundle.parent)) == small_bundle


@pytest.fixture
def copy(small_bundle, tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(small_bundle, target)
    return target


def test_altered_file_is_refused_by_name(copy):
    with (copy / "blender.txt").open("a") as fh:
        fh.write("\n")
    with pytest.raises(BundleIntegrityError, match=r"blender\.txt was altered"):
        bundle_mod.load_core(copy)


def test_missing_file_is_refused_by_name(copy):
    (copy / "embeddings.npz").unlink()
    with pytest.raises(BundleIntegrityError, match=r"embeddings\.npz is missing"):
        bundle_mod.load_core(copy)


def test_manifest_that_omits_a_required_file_is_refused(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["files"]["popularity.parquet"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleIntegrityError, match=r"does not list \['popularity\.parquet'\]"):
        bundle_mod.load_core(copy)


def test_required_files_are_what_training_writes(small_bundle):
    # Training also writes the drift reference, which loading does not require (bundles from before drift load with
    # drift monitoring off).
    written = set(json.loads((small_bundle / "manifest.json").read_text())["files"])
    assert written == bundle_mod.REQUIRED_FILES | {DRIFT_FILE}


def test_a_manifest_missing_a_field_is_refused_by_name(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["settings"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleIntegrityError, match=r"field 'settings'.*retrain"):
        bundle_mod.load_core(copy)


def test_schema_mismatch_is_refused(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["feature_schema"]["hash"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SchemaMismatchError, match="retrain"):
        bundle_mod.load_core(copy)


def test_not_a_bundle(copy, tmp_path):
    (copy / "manifest.json").unlink()
    with pytest.raises(BundleNotFoundError, match=r"manifest\.json"):
        bundle_mod.load_core(copy)
    with pytest.raises(BundleNotFoundError, match="no bundle at"):
        bundle_mod.load_core(tmp_path / "nowhere")
    with pytest.raises(BundleNotFoundError, match="recserve train"):
        bundle_mod.resolve(None, tmp_path / "empty")


def test_existing_version_and_bad_names_are_refused(small_bundle):
    with pytest.raises(ConfigError, match="already exists"):
        train(DATA, small_bundle.parent, SLICE_CUTOFF.date(), "slice-v1")
    with pytest.raises(ConfigError, match="not a usable name"):
        train(DATA, small_bundle.parent, SLICE_CUTOFF.date(), "../escape")
