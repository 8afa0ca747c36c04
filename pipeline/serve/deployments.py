"""Ray Serve deployments: thin shells over the plain stage classes of the chain (chain/) and the HTTP edge.

Each loads its artifacts once, in __init__; replicas, CPUs, GPUs and max_ongoing_requests come from the serve
config; runtime knobs come through user_config and reconfigure.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
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
from pipeline.serve.args import AppArgs
from pipeline.serve.local import freeze_heap, make_api
from pipeline.serve.metrics import RayRecorder
from pipeline.serve.priority import low_priority
from settings import configure_process


@serve.deployment(max_ongoing_requests=64)
class CollaborativeFilter:
    def __init__(self, bundle: str) -> None:
        with low_priority():  # a (re)starting replica leaves the CPU to the ones serving
            configure_process(torch=True)
            path, _, settings = verified(Path(bundle))
            self.stage = CFStage(ALSModel.load(path, settings.cf), device=pick_device())
        freeze_heap()

    async def retrieve(self, q: CFQuery) -> SourceList:
        return self.stage.retrieve(q)


@serve.deployment(max_ongoing_requests=64)
class ContentModel:
    def __init__(self, bundle: str) -> None:
        with low_priority():
            configure_process(torch=True)
            path, _, _ = verified(Path(bundle))
            device = pick_device()
            self.stage = ContentStage(ContentModelClass.load(path, device=device)).warm()
        # On a GPU, queries from concurrent requests are encoded as one batch; on a CPU, batching only adds wait.
        self.batch_queries = device != "cpu"
        freeze_heap()

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.003)
    async def _encode(self, texts: list[str]) -> list[np.ndarray]:
        from models.content import encode

        encoder = self.stage.model._encoder  # loaded by warm()
        return list(encode(encoder, texts, batch_size=len(texts), progress=False))

    async def retrieve(self, q: ContentQuery) -> SourceList:
        vector = None
        if q.query and self.batch_queries:
            vector = await self._encode(normalize_query(q.query))
        elif q.query:  # off the replica's event loop: torch releases the GIL while it encodes
            vector = await asyncio.to_thread(self.stage.encode, normalize_query(q.query))
        return self.stage.retrieve(q, vector)

    async def similar(self, item: int, n: int) -> SourceList:
        return self.stage.similar(item, n)


@serve.deployment(max_ongoing_requests=64)
class Blender:
    def __init__(self, bundle: str) -> None:
        with low_priority():
            process = configure_process(torch=True)
            path, _, _ = verified(Path(bundle))
            self.stage = BlendStage(BlenderModel.load(path, num_threads=1, compile_cache=process.compile_cache))
        freeze_heap()

    async def score(self, x: np.ndarray) -> np.ndarray:
        return self.stage.score(x)


class RemoteStages:
    """Distributed: each stage is a call to its deployment."""

    def __init__(self, cf: DeploymentHandle, content: DeploymentHandle, blend: DeploymentHandle) -> None:
        self.cf_handle, self.content_handle, self.blend_handle = cf, content, blend

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
