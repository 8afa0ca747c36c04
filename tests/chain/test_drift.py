"""The streaming monitor: its window counts equal a batch count of the same requests, it slides, and it publishes."""

from __future__ import annotations

import numpy as np
import pytest

from chain.drift import DriftMonitor
from models.drift import CANDIDATE_COLUMNS, FEATURES, USER_COLUMNS, RequestFeatures, build_reference


def _requests(rng: np.random.Generator, n: int, shift: float = 0.0, known: float = 0.9) -> list[RequestFeatures]:
    out = []
    for _ in range(n):
        k = int(rng.integers(0, 6))
        out.append(
            RequestFeatures(
                (rng.normal(size=len(USER_COLUMNS)) + shift).astype(np.float32),
                (rng.normal(size=(k, len(CANDIDATE_COLUMNS))) + shift).astype(np.float32),
                str(rng.choice(["United Kingdom", "France", "Germany"], p=[0.8, 0.1, 0.1])),
                bool(rng.random() < known),
                bool(rng.random() < 0.05),
            )
        )
    return out


class Gauges:
    def __init__(self) -> None:
        self.values: dict[str, tuple[float, float]] = {}
        self.window: list[int] = []

    def drift(self, feature: str, psi: float, js: float) -> None:
        self.values[feature] = (psi, js)

    def drift_window(self, requests: int) -> None:
        self.window.append(requests)


def test_window_is_the_last_blocks_and_publishes() -> None:
    rng = np.random.default_rng(3)
    ref = build_reference([(r, 1.0) for r in _requests(rng, 2000)])
    gauges = Gauges()
    monitor = DriftMonitor(ref, gauges, block=50, blocks=4)
    assert gauges.window == [0] and set(gauges.values) == set(FEATURES)  # 0 until the first block closes
    assert all(v == (0.0, 0.0) for v in gauges.values.values())
    old, new = _requests(rng, 300), _requests(rng, 200, shift=2.0, known=0.0)
    for r in old + new:
        monitor.observe(r)
    assert gauges.window == [0, 50, 100, 150, 200, 200, 200, 200, 200, 200, 200]
    # The window now holds exactly the last 200 requests: the same numbers as a fresh monitor over them alone.
    fresh = DriftMonitor(ref, block=200, blocks=1)
    for r in new:
        fresh.observe(r)
    for f in FEATURES:
        assert monitor.values[f] == pytest.approx(fresh.values[f])
    assert {"user_recency_days", "request_known_user"} <= set(monitor.over())


def test_no_alarm_on_the_reference_traffic() -> None:
    rng = np.random.default_rng(4)
    ref = build_reference([(r, 1.0) for r in _requests(rng, 3000)])
    monitor = DriftMonitor(ref)
    for r in _requests(rng, 2000):
        monitor.observe(r)
        assert not monitor.over()
