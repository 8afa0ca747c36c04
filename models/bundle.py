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
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.blender import BLENDER_FILE
from models.cf import CF_FILE
from models.content import EMBEDDINGS_FILE
from models.data import sha256_file
from models.drift import Reference, load_reference
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


def write_manifest(directory: Path, files: list[str], meta: dict[str, Any]) -> Manifest:
    manifest = {
        "format_version": FORMAT_VERSION,
        **meta,
        "feature_schema": schema(),
        "files": {name: sha256_file(directory / name) for name in sorted(files)},
    }
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return Manifest.model_validate(manifest)


class Manifest(BaseModel):
    """manifest.json, typed: every reader gets it from `read_manifest`, which checks it once. Fields this code
    does not read (created_at, encoder, catalog, blender_training, environment, ...) are kept as they are."""

    model_config = ConfigDict(extra="allow", frozen=True)

    format_version: int
    version: str
    split: dict[str, str]
    settings: TrainSettings
    files: dict[str, str] = Field(min_length=1)
    feature_schema: dict[str, Any]
    data: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)

    @property
    def cutoff(self) -> pd.Timestamp:
        """The split's cutoff, naive UTC as the data's timestamps are; the feature rows are stamped with it."""
        ts = pd.Timestamp(self.split["cutoff"])
        return ts.tz_convert("UTC").tz_localize(None) if ts.tzinfo else ts


def read_manifest(directory: Path) -> Manifest:
    if not directory.is_dir():
        raise BundleNotFoundError(
            f"no bundle at {directory}: run `recserve train` first, or pass --bundle with a bundle directory"
        )
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise BundleNotFoundError(f"{directory} has no {MANIFEST_FILE}, so it is not a bundle: retrain it")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleIntegrityError(f"{path} is not valid JSON ({exc}): retrain the bundle") from exc
    if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
        found = raw.get("format_version") if isinstance(raw, dict) else None
        raise BundleIntegrityError(f"{path} has format_version {found!r}, this code reads {FORMAT_VERSION}: retrain")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(x) for x in first["loc"])
        raise BundleIntegrityError(f"{path}: field {field!r}: {first['msg']}: retrain the bundle") from None


def verify(directory: Path, manifest: Manifest) -> None:
    """Every listed file is present with its recorded hash, and the schema is the one this code computes."""
    files = manifest.files
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
    recorded = manifest.feature_schema.get("hash")
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
    manifest: Manifest
    settings: TrainSettings
    snapshot: Snapshot
    popularity: Popularity
    drift: Reference | None = None  # None: a bundle trained before drift existed, so drift is off for it

    @property
    def version(self) -> str:
        return self.manifest.version


def verified(directory: Path) -> tuple[Path, Manifest, TrainSettings]:
    """The bundle's manifest once its files' hashes and the feature schema are checked."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    verify(directory, manifest)
    return directory, manifest, manifest.settings


def load_core(directory: Path) -> ServingCore:
    directory, manifest, settings = verified(directory)
    snapshot = Snapshot.load(directory, manifest.cutoff, settings.candidates.history_half_life_days)
    popularity = Popularity.load(directory, snapshot.item_ids)
    drift = load_reference(directory, manifest.files)
    return ServingCore(directory, manifest, settings, snapshot, popularity, drift)
