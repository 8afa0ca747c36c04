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


class BundleStages(Stages, Protocol):
    """Stages that serve several bundles (the distributed topology's model deployments, multiplexed)."""

    def for_bundle(self, bundle: str) -> Stages:
        """The same stages, answering with `bundle`'s models."""
        ...


class Recorder(Protocol):
    def stage(self, stage: str, ms: float) -> None: ...
    def fallback(self, reason: str) -> None: ...
    def candidates(self, n: int) -> None: ...
    def answer(
        self, arm: str, version: str, ms: float, degraded: bool, *, error: bool = False, candidates: int = 0
    ) -> None: ...
    def shadow(self, outcome: str, ms: float, overlap: float | None, tau: float | None) -> None: ...
    def drift(self, feature: str, psi: float, js: float) -> None: ...
    def drift_window(self, requests: int) -> None: ...


class NullRecorder:
    """Records nothing: stage logic run without Ray (unit tests, scripts), and a shadow arm's own chain."""

    def stage(self, stage: str, ms: float) -> None:
        pass

    def fallback(self, reason: str) -> None:
        pass

    def candidates(self, n: int) -> None:
        pass

    def request(self, route: str, status: int, ms: float) -> None:
        pass

    def answer(
        self, arm: str, version: str, ms: float, degraded: bool, *, error: bool = False, candidates: int = 0
    ) -> None:
        pass

    def shadow(self, outcome: str, ms: float, overlap: float | None, tau: float | None) -> None:
        pass

    def events(self, outcome: str, n: int) -> None:
        pass

    def rollback(self, arm: str, reason: str) -> None:
        pass

    def share(self, arm: str, percent: float) -> None:
        pass

    def conversion(self, arm: str, version: str) -> None:
        pass

    def outcome(self, outcome: str, n: int) -> None:
        pass

    def in_flight(self, n: int) -> None:
        pass

    def feature_store(self, state: str) -> None:
        pass

    def drift(self, feature: str, psi: float, js: float) -> None:
        pass

    def drift_window(self, requests: int) -> None:
        pass
