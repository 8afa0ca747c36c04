"""The one typed app builder named in every serve config: `import_path: pipeline.app:build_app`.

It binds the same stage classes in the topology the config names: `colocated` (the models run inside the
ingress replica) or `distributed` (each model is a deployment of its own, with its own replicas and hardware).
"""

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from pipeline.events import EventSettings
from pipeline.service import Knobs
from pipeline.store import StoreSettings

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class AppArgs(BaseModel):
    """The serve config's `args`: validated when the app is built, so a bad config fails before deploying."""

    model_config = ConfigDict(extra="forbid")

    topology: Literal["colocated", "distributed"] = "colocated"
    bundle: Path | None = Field(None, description="bundle directory; default: the one <artifacts>/LATEST names")
    artifacts: Path = Field(PROJECT_ROOT / "artifacts", description="relative paths resolve from the project root")
    store: StoreSettings = Field(default_factory=StoreSettings)
    events: EventSettings = EventSettings()
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
    watch_store: bool = Field(
        True, description="check the bundle's rows in Redis twice a second; restore them after a loss (one replica)"
    )
    stage_threads: int = Field(
        0, ge=0, le=64, description="colocated: 0 runs the model stages inline; n > 0 on a pool of n threads"
    )

    def bundle_path(self) -> Path:
        from models.bundle import resolve

        artifacts = self.artifacts if self.artifacts.is_absolute() else PROJECT_ROOT / self.artifacts
        path = resolve(self.bundle, artifacts)
        return (path if path.is_absolute() else PROJECT_ROOT / path).resolve()


def build_app(args: AppArgs) -> Application:
    from models.bundle import verified
    from pipeline.deployments import Blender, CollaborativeFilter, ContentModel, Ingress

    bundle = args.bundle_path()
    verified(bundle)  # refuse a missing or altered bundle here, with its message, before any replica starts
    settings = args.model_dump(mode="json") | {"bundle": str(bundle)}
    if args.topology == "colocated":
        return Ingress.options(num_replicas=args.ingress_replicas or os.cpu_count() or 1).bind(settings)
    return Ingress.bind(
        settings, CollaborativeFilter.bind(str(bundle)), ContentModel.bind(str(bundle)), Blender.bind(str(bundle))
    )
