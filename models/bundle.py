"""A versioned model bundle: plain files under a manifest that records their sha256 and the feature schema.

Loading verifies every hash and the schema before anything is used, and names the file that is wrong.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from models.blender import BLENDER_FILE
from models.cf import CF_FILE
from models.content import EMBEDDINGS_FILE
from models.data import sha256_file
from models.errors import BundleIntegrityError, BundleNotFoundError, ConfigError, SchemaMismatchError
from models.features import schema
from models.popularity import POPULARITY_FILE, Popularity
from models.settings import TrainSettings
from models.snapshot import CATALOG_FILE, INTERACTIONS_FILE, ITEM_FEATURES_FILE, USER_FEATURES_FILE, Snapshot

MANIFEST_FILE = "manifest.json"
LATEST_FILE = "LATEST"
# 2: feature files carry bundle_version and a UTC event_timestamp for the Feast file sources.
FORMAT_VERSION = 2
# Every file load() reads; a manifest that omits one is refused before anything is opened.
REQUIRED_FILES = frozenset(
    {
        CF_FILE,
        EMBEDDINGS_FILE,
        BLENDER_FILE,
        POPULARITY_FILE,
        CATALOG_FILE,
        ITEM_FEATURES_FILE,
        USER_FEATURES_FILE,
        INTERACTIONS_FILE,
    }
)
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def write_manifest(directory: Path, files: list[str], meta: dict[str, Any]) -> dict[str, Any]:
    manifest = {
        "format_version": FORMAT_VERSION,
        **meta,
        "feature_schema": schema(),
        "files": {name: sha256_file(directory / name) for name in sorted(files)},
    }
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise BundleNotFoundError(
            f"no bundle at {directory}: run `recserve train` first, or pass --bundle with a bundle directory"
        )
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise BundleNotFoundError(f"{directory} has no {MANIFEST_FILE}, so it is not a bundle: retrain it")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleIntegrityError(f"{path} is not valid JSON ({exc}): retrain the bundle") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleIntegrityError(
            f"{path} has format_version {manifest.get('format_version')!r}, this code reads {FORMAT_VERSION}: retrain"
        )
    return manifest


def verify(directory: Path, manifest: dict[str, Any]) -> None:
    """Every listed file is present with its recorded hash, and the schema is the one this code computes."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleIntegrityError(f"{directory / MANIFEST_FILE} lists no files: retrain the bundle")
    unlisted = sorted(REQUIRED_FILES - set(files))
    if unlisted:
        raise BundleIntegrityError(
            f"{directory / MANIFEST_FILE} does not list {unlisted}: the bundle is from an older version or "
            "incomplete; retrain it"
        )
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise BundleIntegrityError(f"bundle file {path} is missing: restore it or retrain the bundle")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleIntegrityError(
                f"bundle file {path} was altered: sha256 {actual[:12]}… but the manifest says {expected[:12]}…; "
                "restore it or retrain the bundle"
            )
    recorded = manifest.get("feature_schema", {}).get("hash")
    current = schema()["hash"]
    if recorded != current:
        raise SchemaMismatchError(
            f"bundle {directory} was built for feature schema {str(recorded)[:12]}… but this code computes "
            f"{current[:12]}…: retrain the bundle with this version"
        )


def resolve(bundle: Path | None, artifacts: Path) -> Path:
    """An explicit bundle directory, or the one artifacts/LATEST names."""
    if bundle is not None:
        return Path(bundle)
    latest = artifacts / LATEST_FILE
    if not latest.is_file():
        raise BundleNotFoundError(f"no bundle in {artifacts}: run `recserve train` first, or pass --bundle DIR")
    return artifacts / latest.read_text().strip()


def check_version_name(version: str) -> str:
    if not VERSION_PATTERN.fullmatch(version):
        raise ConfigError(
            f"--version {version!r} is not a usable name: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return version


@dataclass
class ServingCore:
    """What the ingress holds: the snapshot (history, user-item features), popularity and the catalog.
    The model stages load their own artifacts, so each replica reads only what it serves."""

    path: Path
    manifest: dict[str, Any]
    settings: TrainSettings
    snapshot: Snapshot
    popularity: Popularity

    @property
    def version(self) -> str:
        return str(self.manifest["version"])


def verified(directory: Path) -> tuple[Path, dict[str, Any], TrainSettings]:
    directory = Path(directory)
    manifest = read_manifest(directory)
    verify(directory, manifest)
    return directory, manifest, TrainSettings.model_validate(manifest["settings"])


def load_core(directory: Path) -> ServingCore:
    directory, manifest, settings = verified(directory)
    cutoff = pd.Timestamp(manifest["split"]["cutoff"])
    snapshot = Snapshot.load(directory, cutoff, settings.candidates.history_half_life_days)
    popularity = Popularity.load(directory, snapshot.item_ids)
    return ServingCore(directory, manifest, settings, snapshot, popularity)
