"""Where the model stages run: in this process (`LocalStages`, the colocated topology), or wrapped to fail on
purpose for drills (`ChaosStages`). The distributed topology's handles are in pipeline/serve/deployments.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from chain.knobs import Chaos
from chain.ports import Stages
from chain.retrieve import CFQuery, CFStage, ContentQuery, ContentStage, normalize_query
from chain.score import BlendStage
from chain.types import SourceList

T = TypeVar("T")


class LocalStages:
    """The stages in this process. With threads=0 they run inline on the event loop: fastest on few cores, where
    worker threads contend for the GIL (p50 doubled at 30 req/s here). With threads > 0 they run on a pool, so a
    stage that stalls past its deadline can be abandoned while the request answers. A free-text query is always
    encoded on a worker thread: the encoder takes 15-25 ms of CPU and torch releases the GIL, so other requests
    keep flowing meanwhile."""

    def __init__(self, cf: CFStage, content: ContentStage, blend: BlendStage, threads: int = 0) -> None:
        self.cf_stage = cf
        self.content_stage = content
        self.blend_stage = blend
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="stage") if threads > 0 else None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self.pool is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def cf(self, q: CFQuery) -> SourceList:
        return await self._run(self.cf_stage.retrieve, q)

    async def content(self, q: ContentQuery) -> SourceList:
        vector = await asyncio.to_thread(self.content_stage.encode, normalize_query(q.query)) if q.query else None
        return await self._run(self.content_stage.retrieve, q, vector)

    async def blend(self, x: np.ndarray) -> np.ndarray:
        return await self._run(self.blend_stage.score, x)

    async def similar(self, item: int, n: int) -> SourceList:
        return await self._run(self.content_stage.similar, item, n)


class ChaosStages:
    """Wraps real stages and makes the one named in Knobs.chaos fail or stall: fallback drills in production."""

    def __init__(self, inner: Stages, chaos: Chaos | None = None) -> None:
        self.inner = inner
        self.chaos = chaos  # set by the chain's reconfigure

    async def _maybe(self, stage: str, call: Callable[[], Awaitable[T]]) -> T:
        c = self.chaos
        if c is not None and c.stage == stage:
            if c.mode == "error":
                raise RuntimeError(f"chaos: stage {stage} fails on purpose")
            await asyncio.sleep(c.delay_ms / 1000)
        return await call()

    async def cf(self, q: CFQuery) -> SourceList:
        return await self._maybe("cf", lambda: self.inner.cf(q))

    async def content(self, q: ContentQuery) -> SourceList:
        return await self._maybe("content", lambda: self.inner.content(q))

    async def blend(self, x: np.ndarray) -> np.ndarray:
        return await self._maybe("blend", lambda: self.inner.blend(x))

    async def similar(self, item: int, n: int) -> SourceList:
        return await self.inner.similar(item, n)
