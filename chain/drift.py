"""Drift per replica: streaming counts of each request's blender inputs against the bundle's reference.

`DriftMonitor.observe` bins one request's features into the current block's counts (the bins are the reference's,
models/drift.py). Every `block` requests the block closes, and PSI and Jensen-Shannon distance per feature are
computed over the last `blocks` closed blocks (a sliding window of block * blocks requests, 1,000 by default) and
published (`recserve_drift_psi{feature}`, `recserve_drift_js_distance{feature}`, and the requests they are over,
`recserve_drift_window_requests`). Memory is blocks x (all features' bins): about 4 x 300 floats, whatever the
traffic.

Until the first block closes the gauges read 0 with `recserve_drift_window_requests` 0: nothing measured yet, not
"no drift"; the alert rules cannot fire on it (0 is under every threshold).

The thresholds are set from a replay of the holdout period's real traffic (loadtests/drift_drill.py; figures in
docs/benchmarks.md) and written in deploy/alerts.yml; a test checks that the two agree.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np

from chain.types import Context
from models.drift import (
    CANDIDATE_COLUMNS,
    CANDIDATE_INDEX,
    CATEGORICAL_COLUMNS,
    FEATURES,
    OTHER,
    USER_COLUMNS,
    Reference,
    RequestFeatures,
    js_distance,
    psi,
)

BLOCK = 250  # requests per block: the gauges move once per block
BLOCKS = 4  # blocks per window: the gauges are over the last 1,000 requests
MAX_CANDIDATES = 32  # candidate rows counted per request: an even stride over them (the cost bar is 0.1 ms)
# Features tied to the calendar: ages measured from the data's first day (every item and customer is a window
# older at serving than in the reference) and popularity, which follows the season. The holdout replay moves them
# by construction (November against October), so they have thresholds of their own; every other feature is
# "steady".
CALENDAR_FEATURES = frozenset(
    {
        "user_tenure_days",
        "item_days_since_first_sale",
        "item_days_since_last_sale",
        "item_pop_7d",
        "item_pop_30d",
        "item_pop_90d",
        "popularity_score",
    }
)
# Alarm thresholds (PSI, JS distance) per tier: the holdout replay's highest value over the tier's features and
# every window (default bundle), times 1.5, rounded up to 0.01 (loadtests/drift_drill.py; docs/benchmarks.md,
# "Drift"). deploy/alerts.yml holds the same numbers; tests/deploy/test_alerts.py checks that they agree.
THRESHOLDS: dict[str, tuple[float, float]] = {"steady": (0.25, 0.26), "calendar": (7.43, 1.04)}
PSI_THRESHOLD, JS_THRESHOLD = THRESHOLDS["steady"]


def tier(feature: str) -> str:
    return "calendar" if feature in CALENDAR_FEATURES else "steady"


class DriftSink(Protocol):
    def drift(self, feature: str, psi: float, js: float) -> None: ...
    def drift_window(self, requests: int) -> None: ...


def request_features(ctx: Context, x: np.ndarray) -> RequestFeatures:
    """What drift counts of one request: its context and its blender rows x, float32 (n, len(BLENDER_FEATURES))."""
    return RequestFeatures(ctx.numeric, x[:, CANDIDATE_INDEX], ctx.country, ctx.row is not None, bool(ctx.query.query))


def _padded(edges: list[np.ndarray]) -> np.ndarray:
    """float64 (len(edges), max length): each feature's edges, padded with +inf (never >=)."""
    width = max((len(e) for e in edges), default=0)
    out = np.full((len(edges), width), np.inf)
    for j, e in enumerate(edges):
        out[j, : len(e)] = e
    return out


class DriftMonitor:
    """Streaming counts per feature over a sliding window of requests; see the module's docstring."""

    def __init__(
        self,
        reference: Reference,
        sink: DriftSink | None = None,
        block: int = BLOCK,
        blocks: int = BLOCKS,
        log: Callable[[float, RequestFeatures, np.ndarray], None] | None = None,
    ) -> None:
        """`log(ts, features, candidate)` receives each request (time in s since the epoch, its features, one
        candidate row drawn at random from those counted (the stride), float32 (len(CANDIDATE_COLUMNS),), NaN when it
        has none): the input of `recserve drift report` (pipeline/serve/driftlog.py writes it)."""
        self.reference = reference
        self.sink = sink
        self.block, self.blocks, self.log = block, blocks, log
        self._slices: dict[str, slice] = {}
        self._expected: dict[str, np.ndarray] = {}
        at = 0
        for name in FEATURES:
            probs = reference.numeric[name].probs if name in reference.numeric else reference.categorical[name].probs
            self._slices[name] = slice(at, at + len(probs))
            self._expected[name] = probs
            at += len(probs)
        self.size = at

        def layout(cols: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            bins = [reference.numeric[c] for c in cols]
            offsets = np.array([self._slices[c].start for c in cols], dtype=np.int64)
            nan_bin = np.array([len(b.edges) + 1 for b in bins], dtype=np.int64)
            return _padded([b.edges for b in bins]), offsets, nan_bin

        self._u_edges, self._u_off, self._u_nan = layout(USER_COLUMNS)
        self._c_edges, self._c_off, self._c_nan = layout(CANDIDATE_COLUMNS)
        self._cats = []
        for name in CATEGORICAL_COLUMNS:
            c = reference.categorical[name]
            index = {v: self._slices[name].start + i for i, v in enumerate(c.categories)}
            self._cats.append((index, index.get(OTHER)))
        self._no_candidate = np.full(len(CANDIDATE_COLUMNS), np.nan, np.float32)
        self._rows = np.zeros((blocks, self.size))
        self._cur = 0
        self._in_block = 0
        self._closed = 0
        self.requests = 0
        self.values: dict[str, tuple[float, float]] = dict.fromkeys(FEATURES, (0.0, 0.0))
        self.window_requests = 0
        self._publish()

    def observe_context(self, ctx: Context, x: np.ndarray) -> None:
        self.observe(request_features(ctx, x))

    def observe(self, f: RequestFeatures) -> None:
        """Count one request; closes the block (and publishes) every `block` requests."""
        row = self._rows[self._cur]
        u = f.user
        ub = (u[:, None] >= self._u_edges).sum(1)
        row[np.where(np.isnan(u), self._u_nan, ub) + self._u_off] += 1.0
        c = f.candidates
        n = c.shape[0]
        if n > MAX_CANDIDATES:
            c = c[:: -(-n // MAX_CANDIDATES)]
            n = c.shape[0]
        if n:
            cb = (c[:, :, None] >= self._c_edges[None]).sum(2)
            cb = np.where(np.isnan(c), self._c_nan, cb) + self._c_off
            row += np.bincount(cb.ravel(), minlength=self.size) * (1.0 / n)
        for (index, other), value in zip(self._cats, f.categories(), strict=True):
            i = index.get(value, other)
            if i is not None:
                row[i] += 1.0
        if self.log is not None:
            # The logged candidate is drawn from the rows counted (the stride), so the log samples what the gauges
            # count: drawn from all of them, it disagreed with the gauges where the stride is not representative.
            self.log(time.time(), f, c[random.randrange(n)] if n else self._no_candidate)
        self.requests += 1
        self._in_block += 1
        if self._in_block >= self.block:
            self._close()

    def distances(self, counts: np.ndarray) -> dict[str, tuple[float, float]]:
        """PSI and JS distance per feature of the counts (float (size,), this monitor's layout) against the
        reference; (0, 0) for a feature with nothing counted."""
        out: dict[str, tuple[float, float]] = {}
        for name, sl in self._slices.items():
            part = counts[sl]
            total = part.sum()
            if total <= 0:
                out[name] = (0.0, 0.0)
                continue
            actual = part / total
            out[name] = (psi(self._expected[name], actual), js_distance(self._expected[name], actual))
        return out

    def current(self) -> dict[str, tuple[float, float]]:
        """PSI and JS per feature over everything counted now (the closed blocks and the open one)."""
        return self.distances(self._rows.sum(0))

    def _close(self) -> None:
        self._closed = min(self._closed + 1, self.blocks)
        self.values = self.distances(self._rows.sum(0))
        self.window_requests = self._closed * self.block
        self._cur = (self._cur + 1) % self.blocks
        self._rows[self._cur] = 0.0
        self._in_block = 0
        self._publish()

    def _publish(self) -> None:
        if self.sink is None:
            return
        for name, (p, j) in self.values.items():
            self.sink.drift(name, p, j)
        self.sink.drift_window(self.window_requests)

    def over(self, thresholds: dict[str, tuple[float, float]] | None = None) -> list[str]:
        """The features whose current PSI or JS distance is over its tier's threshold (default THRESHOLDS: what the
        alert rules fire on)."""
        return over(self.values, thresholds or THRESHOLDS)


def over(values: dict[str, tuple[float, float]], thresholds: dict[str, tuple[float, float]]) -> list[str]:
    """The features of `values` (feature: (PSI, JS)) over their tier's (PSI, JS) threshold."""
    out = []
    for name, (p, j) in values.items():
        psi_t, js_t = thresholds[tier(name)]
        if p > psi_t or j > js_t:
            out.append(name)
    return out
