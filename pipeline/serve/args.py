"""The serve config's `args`, typed: what `build_app` and every Ingress replica are given. What a config leaves out
(the artifacts root, the feature store) comes from the process settings (settings.Settings), read where the app
is built; each replica is handed the resolved values."""

from pathlib import Path, PurePath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from chain.knobs import Knobs
from models.bundle import resolve
from models.remote import is_uri, localize
from pipeline.featurestore.events import EventSettings
from pipeline.featurestore.outcomes import OutcomeSettings
from settings import PROJECT_ROOT, Settings, StoreSettings


class AppArgs(BaseModel):
    """The serve config's `args`: validated when the app is built, so a bad config fails before deploying."""

    model_config = ConfigDict(extra="forbid")

    topology: Literal["colocated", "distributed"] = "colocated"
    bundle: str | None = Field(
        None,
        description="the bundle: a directory, or a URI (s3://bucket/prefix/<version>/) that each replica fetches "
        "into its node's cache (RECSERVE_BUNDLE_CACHE); default: the directory <artifacts>/LATEST names",
    )
    artifacts: Path = Field(
        default_factory=lambda: Settings().artifacts,
        description="default: RECSERVE_ARTIFACTS, else the project's artifacts/; relative paths resolve from the "
        "project root",
    )
    store: StoreSettings = Field(default_factory=StoreSettings)
    events: EventSettings = EventSettings()
    outcomes: OutcomeSettings = Field(
        OutcomeSettings(), description="online outcomes of a rollout: attribution window, exposure flushing"
    )
    drift_log_dir: Path | None = Field(
        default_factory=lambda: Settings().drift_log_dir,
        description="where the replica logs its drift monitor's request features (default: RECSERVE_DRIFT_LOG_DIR; "
        "unset: not logged)",
    )
    knobs: Knobs = Field(Knobs(), description="initial runtime knobs; the Ingress's user_config overrides them")
    max_body_bytes: int = Field(
        1_000_000, ge=1024, le=100_000_000, description="a request body's limit, as sent and once decoded (413)"
    )
    body_timeout_s: float = Field(
        5.0, gt=0, le=300, description="a request's body must arrive within this long of its headers, else 408"
    )
    ingress_replicas: int | None = Field(
        None,
        ge=1,
        le=256,
        description="colocated: ingress replicas when the serve config's Ingress sets no num_replicas; default one "
        "per core of the node that builds the app (each holds the models; HAProxy balances over them)",
    )
    load_settle_s: float = Field(
        0.0,
        ge=0,
        le=60,
        description="a rollout switch that loads waits this long, once, before the replicas take turns to load, so "
        "that Serve's one-replica-at-a-time config update and HAProxy's reloads have passed (chain/rollout.Rollout); "
        "about 0.5 s a replica plus 1 s",
    )
    watch_store: bool = Field(
        True, description="check the bundle's rows in Redis twice a second; restore them after a loss (one replica)"
    )
    stage_threads: int = Field(
        0, ge=0, le=64, description="colocated: 0 runs the model stages inline; n > 0 on a pool of n threads"
    )

    @field_validator("bundle", mode="before")
    @classmethod
    def _path_or_uri(cls, value: object) -> object:
        return str(value) if isinstance(value, PurePath) else value  # a directory given as a Path

    def bundle_ref(self) -> str:
        """The bundle as every replica is handed it: a URI as given, else an absolute directory."""
        if self.bundle is not None and is_uri(self.bundle):
            return self.bundle
        artifacts = self.artifacts if self.artifacts.is_absolute() else PROJECT_ROOT / self.artifacts
        path = resolve(Path(self.bundle) if self.bundle else None, artifacts)
        return str((path if path.is_absolute() else PROJECT_ROOT / path).resolve())


def local_bundle(ref: str | Path, cache: Path | None = None) -> Path:
    """The directory of the bundle `ref` names on this node: a URI is fetched into this node's cache (`cache`, else
    RECSERVE_BUNDLE_CACHE) and every file verified, once per node (models/remote.py)."""
    return localize(ref, cache or Settings().bundle_cache)
