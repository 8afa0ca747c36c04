"""What the chain needs from outside, as protocols: a feature store, the model stages, a metrics recorder.

Implementations: the Redis online store (pipeline/featurestore/store.py `OnlineFeatures`) or the bundle's own features
(`context.BundleFeatures`); the stages in-process (`runtimes.LocalStages`) or behind Ray Serve handles
(pipeline/serve/deployments.py `RemoteStages`).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from chain.retrieve import CFQuery, ContentQuery
from chain.types import SourceList, UserRow


class FeatureStore(Protocol):
    item_matrix: np.ndarray  # float32 (n_items, len(ITEM_FEATURES)), catalog order

    def user(self, user_id: str) -> UserRow:
        """The user's row; raises models.errors.FeatureStoreError when the store cannot answer."""
        ...


class Stages(Protocol):
    async def cf(self, q: CFQuery) -> SourceList: ...
    async def content(self, q: ContentQuery) -> SourceList: ...
    async def blend(self, x: np.ndarray) -> np.ndarray: ...
    async def similar(self, item: int, n: int) -> SourceList: ...


class Recorder(Protocol):
    def stage(self, stage: str, ms: float) -> None: ...
    def fallback(self, reason: str) -> None: ...
    def candidates(self, n: int) -> None: ...
    def answer(self, arm: str, version: str, ms: float, degraded: bool) -> None: ...
