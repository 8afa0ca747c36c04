"""Ray Serve deployments: thin shells over the plain stage classes in models/serving.py and pipeline/.

Each loads its artifacts once, in __init__; replicas, CPUs, GPUs and max_ongoing_requests come from the serve
config; runtime knobs come through user_config and reconfigure.
"""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from models.blender import Blender as BlenderModel
from models.bundle import load_core, verified
from models.cf import ALSModel
from models.content import ContentModel as ContentModelClass
from models.content import pick_device
from models.errors import RecserveError
from models.serving import BlendStage, CFQuery, CFStage, ContentQuery, ContentStage, SourceList
from pipeline.api import Api, build_api
from pipeline.events import EventWriter
from pipeline.metrics import RayRecorder
from pipeline.service import Knobs, LocalStages, RecommendService
from pipeline.store import OnlineFeatures, open_store

log = logging.getLogger("recserve")


def _freeze() -> None:
    # Loading torch, Feast and the bundle leaves millions of long-lived objects; unfrozen, every full GC walks
    # them all and stalls the replica's loop for tens of ms under load.
    gc.collect()
    gc.freeze()


def _threads() -> None:
    # Two cores: one BLAS/torch thread per replica; more only contend.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ.get("RECSERVE_TORCH_THREADS", "1")))


@serve.deployment(max_ongoing_requests=64)
class CollaborativeFilter:
    def __init__(self, bundle: str) -> None:
        _threads()
        path, _, settings = verified(Path(bundle))
        self.stage = CFStage(ALSModel.load(path, settings.cf), device=pick_device())
        _freeze()

    async def retrieve(self, q: CFQuery) -> SourceList:
        return self.stage.retrieve(q)


@serve.deployment(max_ongoing_requests=64)
class ContentModel:
    def __init__(self, bundle: str) -> None:
        _threads()
        path, _, _ = verified(Path(bundle))
        device = pick_device()
        self.stage = ContentStage(ContentModelClass.load(path, device=device)).warm()
        # On a GPU, queries from concurrent requests are encoded as one batch; on a CPU, batching only adds wait.
        self.batch_queries = device != "cpu"
        _freeze()

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.003)
    async def _encode(self, texts: list[str]) -> list[np.ndarray]:
        from models.content import encode

        encoder = self.stage.model._encoder  # loaded by warm()
        return list(encode(encoder, texts, batch_size=len(texts), progress=False))

    async def retrieve(self, q: ContentQuery) -> SourceList:
        vector = await self._encode(q.query) if (q.query and self.batch_queries) else None
        return self.stage.retrieve(q, vector)

    async def similar(self, item: int, n: int) -> SourceList:
        return self.stage.similar(item, n)


@serve.deployment(max_ongoing_requests=64)
class Blender:
    def __init__(self, bundle: str) -> None:
        _threads()
        path, _, _ = verified(Path(bundle))
        self.stage = BlendStage(BlenderModel.load(path, num_threads=1))
        _freeze()

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

    @classmethod
    def get(cls) -> Api:
        if cls.api is None:
            raise RuntimeError("the ingress is still starting")
        return cls.api


fastapi_app = build_api(_Current.get, set_request_id=False)


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(fastapi_app)
class Ingress:
    def __init__(
        self,
        args: dict[str, Any],
        cf: DeploymentHandle | None = None,
        content: DeploymentHandle | None = None,
        blend: DeploymentHandle | None = None,
    ) -> None:
        from pipeline.app import AppArgs

        _threads()
        settings = AppArgs.model_validate(args)
        bundle = Path(str(settings.bundle))
        core = load_core(bundle)
        if cf is None or content is None or blend is None:
            path, _, train_settings = verified(bundle)
            device = pick_device()
            stages: Any = LocalStages(
                CFStage(ALSModel.load(path, train_settings.cf), device=device),
                ContentStage(ContentModelClass.load(path, device=device)).warm(),
                BlendStage(BlenderModel.load(path, num_threads=1)),
                threads=settings.stage_threads,
            )
        else:
            stages = RemoteStages(cf, content, blend)
        recorder = RayRecorder(core.version, settings.topology)
        store = settings.store
        try:
            features = OnlineFeatures.load(store, core.version, core.snapshot.item_ids.tolist())
        except RecserveError as exc:
            # Still serve: item features are the bundle's own (the same values, see test_store), users degrade.
            log.warning("feature store not usable at start (%s); serving bundle features until it is", exc)
            features = OnlineFeatures(store, core.version, core.snapshot.item_ids, core.snapshot.item_matrix)
        service = RecommendService(core, features, stages, settings.knobs, recorder)

        def writer() -> EventWriter:
            return EventWriter(open_store(store), store, settings.events)

        api = Api(service, store, settings.events, writer, recorder)
        try:
            api.writer()  # now, not inside the first POST /events (opening Feast's registry takes ~0.7 s)
        except RecserveError as exc:
            log.warning("event writer not ready at start (%s); it will be made on the first event", exc)
        _Current.api = api
        _freeze()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        _Current.get().service.reconfigure(Knobs.model_validate(user_config))
