"""Ray Serve deployments: thin shells over the plain stage classes of the chain (chain/) and the HTTP edge.

Each loads its artifacts once, in __init__; replicas, CPUs, GPUs and max_ongoing_requests come from the serve
config; runtime knobs come through user_config and reconfigure.

Rollouts in the distributed topology use Ray Serve's model multiplexing: a request for another bundle than the
application's carries the bundle as its multiplexed model id, and a model replica loads that bundle's stage on
first use (at most `MODELS_PER_REPLICA`, least recently used out), while Serve routes the bundle's requests to the
replicas that hold it. Why not per-version deployments: adding a deployment changes the application's args (a
code change to Serve: every replica restarts, the outage a rollout must avoid), while a model id is per request.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from chain.retrieve import CFQuery, CFStage, ContentQuery, ContentStage, normalize_query
from chain.score import BlendStage
from chain.types import SourceList
from models.blender import Blender as BlenderModel
from models.bundle import verified
from models.cf import ALSModel
from models.content import ContentModel as ContentModelClass
from models.content import pick_device
from pipeline.edge.api import Api, build_api
from pipeline.edge.auth import KeyRing
from pipeline.serve.args import AppArgs, local_bundle
from pipeline.serve.local import freeze_heap, make_api
from pipeline.serve.metrics import RayRecorder
from pipeline.serve.priority import low_priority
from settings import configure_process

# The application's bundle plus two rollout bundles (a canary and the one it replaces, during a switch).
MODELS_PER_REPLICA = 3


class _ToServeLog(logging.Handler):
    """Writes each record with Serve's replica log handlers: the replica's own log file
    (<ray temp>/session_latest/logs/serve/replica_<app>_<deployment>_<id>.log), in Serve's format. Straight to the
    file: Serve's MemoryHandler in front of it holds up to 1,000 records under RAY_SERVE_THROUGHPUT_OPTIMIZED and
    writes them only when full or at an ERROR, and a warning about a request is wanted while it is news."""

    def emit(self, record: logging.LogRecord) -> None:
        for handler in logging.getLogger("ray.serve").handlers:
            target = getattr(handler, "target", None)  # a MemoryHandler's file handler
            (target if isinstance(target, logging.Handler) else handler).handle(record)


def serve_logs() -> None:
    """Send the "recserve" logger's lines (warnings and errors: a failed request, a slow one with its request id
    and trace id) to the replica's Serve log file. Left alone they reach nothing: the root logger has no handler
    in a replica, and Python's last resort writes to sys.stderr, which Serve turns into INFO records of its own
    logger, below the serve config's log_level (WARNING)."""
    ours = logging.getLogger("recserve")
    if not any(isinstance(h, _ToServeLog) for h in ours.handlers):
        ours.addHandler(_ToServeLog())
        ours.propagate = False


class _Multiplexed:
    """A model deployment's stage for the request's bundle: the application's own, loaded in __init__, or another
    bundle's (a rollout arm), loaded on first use through Serve's model multiplexing."""

    bundle: str
    stage: Any

    def _load(self, bundle: str) -> Any:
        raise NotImplementedError

    @serve.multiplexed(max_num_models_per_replica=MODELS_PER_REPLICA)
    async def _other(self, bundle: str) -> Any:
        return await asyncio.to_thread(self._load, bundle)

    async def current(self) -> Any:
        bundle = serve.get_multiplexed_model_id()
        return self.stage if not bundle or bundle == self.bundle else await self._other(bundle)


@serve.deployment(max_ongoing_requests=64)
class CollaborativeFilter(_Multiplexed):
    def __init__(self, bundle: str) -> None:
        serve_logs()
        with low_priority():  # a (re)starting replica leaves the CPU to the ones serving
            configure_process(torch=True)
            self.bundle = bundle
            self.stage = self._load(bundle)
        freeze_heap()

    def _load(self, bundle: str) -> CFStage:
        path, _, settings = verified(local_bundle(bundle))
        return CFStage(ALSModel.load(path, settings.cf), device=pick_device())

    async def retrieve(self, q: CFQuery) -> SourceList:
        return (await self.current()).retrieve(q)


@serve.deployment(max_ongoing_requests=64)
class ContentModel(_Multiplexed):
    def __init__(self, bundle: str) -> None:
        serve_logs()
        with low_priority():
            configure_process(torch=True)
            self.bundle = bundle
            self.device = pick_device()
            self.stage = self._load(bundle)
        # On a GPU, queries from concurrent requests are encoded as one batch; on a CPU, batching only adds wait.
        self.batch_queries = self.device != "cpu"
        freeze_heap()

    def _load(self, bundle: str) -> ContentStage:
        path, _, _ = verified(local_bundle(bundle))
        return ContentStage(ContentModelClass.load(path, device=self.device)).warm()

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.003)
    async def _encode(self, texts: list[str]) -> list[np.ndarray]:
        from models.content import encode

        encoder = self.stage.model._encoder  # loaded by warm()
        return list(encode(encoder, texts, batch_size=len(texts), progress=False))

    async def retrieve(self, q: ContentQuery) -> SourceList:
        stage = await self.current()
        vector = None
        if q.query and self.batch_queries:  # the encoder is one for every bundle (models.content.load_encoder)
            vector = await self._encode(normalize_query(q.query))
        elif q.query:  # off the replica's event loop: torch releases the GIL while it encodes
            vector = await asyncio.to_thread(stage.encode, normalize_query(q.query))
        return stage.retrieve(q, vector)

    async def similar(self, item: int, n: int) -> SourceList:
        return (await self.current()).similar(item, n)


@serve.deployment(max_ongoing_requests=64)
class Blender(_Multiplexed):
    def __init__(self, bundle: str) -> None:
        serve_logs()
        with low_priority():
            self.process = configure_process(torch=True)
            self.bundle = bundle
            self.stage = self._load(bundle)
        freeze_heap()

    def _load(self, bundle: str) -> BlendStage:
        path, _, _ = verified(local_bundle(bundle))
        return BlendStage(BlenderModel.load(path, num_threads=1, compile_cache=self.process.compile_cache))

    async def score(self, x: np.ndarray) -> np.ndarray:
        return (await self.current()).score(x)


class RemoteStages:
    """Distributed: each stage is a call to its deployment; `bundle` (another than the application's) goes with
    each call as its multiplexed model id, for a rollout arm."""

    def __init__(
        self, cf: DeploymentHandle, content: DeploymentHandle, blend: DeploymentHandle, bundle: str | None = None
    ) -> None:
        self.cf_handle, self.content_handle, self.blend_handle = cf, content, blend
        if bundle is not None:
            self.cf_handle, self.content_handle, self.blend_handle = (
                h.options(multiplexed_model_id=bundle) for h in (cf, content, blend)
            )

    def for_bundle(self, bundle: str) -> RemoteStages:
        return RemoteStages(self.cf_handle, self.content_handle, self.blend_handle, bundle)

    async def cf(self, q: CFQuery) -> SourceList:
        return await self.cf_handle.retrieve.remote(q)

    async def content(self, q: ContentQuery) -> SourceList:
        return await self.content_handle.retrieve.remote(q)

    async def blend(self, x: np.ndarray) -> np.ndarray:
        return await self.blend_handle.score.remote(x)

    async def similar(self, item: int, n: int) -> SourceList:
        return await self.content_handle.similar.remote(item, n)


class _Current:
    """The replica's Api, for the module-level FastAPI app's routes."""

    api: Api | None = None
    # The app's edge limits from the replica's args (AppArgs), read per request; defaults until the replica starts.
    max_body_bytes: int = 1_000_000
    body_timeout_s: float = 5.0
    # The replica's API keys (RECSERVE_API_KEYS, RECSERVE_API_KEYS_FILE); none until it starts: guarded routes refuse.
    keys: KeyRing = KeyRing.none()

    @classmethod
    def get(cls) -> Api:
        if cls.api is None:
            raise RuntimeError("the ingress is still starting")
        return cls.api


fastapi_app = build_api(
    _Current.get,
    set_request_id=False,
    max_body_bytes=lambda: _Current.max_body_bytes,
    body_timeout_s=lambda: _Current.body_timeout_s,
    keys=lambda: _Current.keys,
)


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(fastapi_app)
class Ingress:
    # Async, so the replica warms every path and starts its store watch before Serve counts it as running and
    # HAProxy sends it traffic (a restarted replica too).
    async def __init__(  # type: ignore[misc]
        self,
        settings: AppArgs,
        cf: DeploymentHandle | None = None,
        content: DeploymentHandle | None = None,
        blend: DeploymentHandle | None = None,
    ) -> None:
        serve_logs()
        with low_priority():
            process = configure_process(torch=True)
            _Current.max_body_bytes, _Current.body_timeout_s = settings.max_body_bytes, settings.body_timeout_s
            _Current.keys = KeyRing(process.auth)
            remote = None if cf is None or content is None or blend is None else RemoteStages(cf, content, blend)
            api = make_api(
                settings, remote, lambda version: RayRecorder(version, settings.topology), process.compile_cache
            )
            await api.start()
        _Current.api = api
        freeze_heap()

    async def __del__(self) -> None:
        if _Current.api is not None:
            await _Current.api.stop()

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        # Returns at once: a rollout's new bundles load in the background, and the replica keeps serving meanwhile
        # (a replica in Serve's UPDATING state could leave the routing table).
        _Current.get().reconfigure(user_config)
