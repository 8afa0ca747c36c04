"""The app's Prometheus metrics, recorded through Ray's metrics API: Ray's metrics agent on every node serves
them (with Ray's own) on its export port, which deploy/prometheus.yml scrapes."""

from __future__ import annotations

# Fine below 100 ms, where the SLO lives; coarse above.
LATENCY_MS = [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 70, 80, 100, 150, 250, 500, 1000, 2500]
CANDIDATES = [10, 25, 50, 75, 100, 150, 200, 250, 300, 400, 500]


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """The q-quantile of a Prometheus histogram given as (le, cumulative count) pairs in order of le: linear
    interpolation within the bucket that holds the rank, as PromQL's histogram_quantile does (Prometheus docs,
    "histogram_quantile()"). NaN for an empty histogram; the highest finite bound when the rank is in +Inf."""
    if not buckets or buckets[-1][1] <= 0:
        return float("nan")
    rank, prev_le, prev_n = q * buckets[-1][1], 0.0, 0.0
    for le, n in buckets:
        if n >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_n) / (n - prev_n) if n > prev_n else 1.0)
        prev_le, prev_n = le, n
    return prev_le


class NullRecorder:
    """For stage logic run without Ray (unit tests, scripts)."""

    def stage(self, stage: str, ms: float) -> None:
        pass

    def fallback(self, reason: str) -> None:
        pass

    def candidates(self, n: int) -> None:
        pass

    def request(self, route: str, status: int, ms: float) -> None:
        pass

    def answer(self, arm: str, version: str, ms: float, degraded: bool) -> None:
        pass

    def events(self, outcome: str, n: int) -> None:
        pass

    def conversion(self, arm: str, version: str) -> None:
        pass

    def arm_error(self, arm: str, version: str) -> None:
        pass

    def outcome(self, outcome: str, n: int) -> None:
        pass


class RayRecorder:
    def __init__(self, version: str, topology: str) -> None:
        from ray.serve import metrics

        self._requests = metrics.Counter(
            "recserve_requests", description="HTTP requests by route and status", tag_keys=("route", "status")
        )
        self._latency = metrics.Histogram(
            "recserve_request_latency_ms",
            description="end-to-end latency in the ingress",
            boundaries=LATENCY_MS,
            tag_keys=("route",),
        )
        self._stage = metrics.Histogram(
            "recserve_stage_latency_ms", description="latency of each stage", boundaries=LATENCY_MS, tag_keys=("stage",)
        )
        self._fallbacks = metrics.Counter(
            "recserve_fallbacks", description="degraded answers by reason", tag_keys=("reason",)
        )
        self._candidates = metrics.Histogram(
            "recserve_candidates", description="merged candidates per request", boundaries=CANDIDATES
        )
        self._events = metrics.Counter("recserve_events", description="events by outcome", tag_keys=("outcome",))
        # Per rollout arm: what `recserve rollout status` and a canary's comparison with the champion read.
        self._arm_answers = metrics.Counter(
            "recserve_arm_answers",
            description="/recommend answers by rollout arm, bundle and degraded",
            tag_keys=("arm", "version", "degraded"),
        )
        self._arm_latency = metrics.Histogram(
            "recserve_arm_latency_ms",
            description="/recommend latency in the chain by rollout arm and bundle",
            boundaries=LATENCY_MS,
            tag_keys=("arm", "version"),
        )
        # Online outcomes (pipeline/featurestore/outcomes.py): hit rate per arm in PromQL is
        # rate(ray_recserve_arm_conversions_total) / rate(ray_recserve_arm_answers_total), summed by arm.
        self._arm_conversions = metrics.Counter(
            "recserve_arm_conversions",
            description="answers converted by an add_to_cart or purchase of a shown item within the attribution "
            "window, by rollout arm and bundle (once per answer)",
            tag_keys=("arm", "version"),
        )
        self._arm_errors = metrics.Counter(
            "recserve_arm_errors",
            description="/recommend answers whose chain failed (the popularity rung, internal_error) by arm and bundle",
            tag_keys=("arm", "version"),
        )
        self._outcomes = metrics.Counter(
            "recserve_outcomes",
            description="outcome bookkeeping: exposures_flushed, exposures_dropped, flush_failed, attribution_failed",
            tag_keys=("outcome",),
        )
        info = metrics.Gauge("recserve_model_info", description="the bundle served", tag_keys=("version", "topology"))
        info.set(1, tags={"version": version, "topology": topology})

    def stage(self, stage: str, ms: float) -> None:
        self._stage.observe(ms, tags={"stage": stage})

    def fallback(self, reason: str) -> None:
        self._fallbacks.inc(1, tags={"reason": reason})

    def candidates(self, n: int) -> None:
        self._candidates.observe(n)

    def request(self, route: str, status: int, ms: float) -> None:
        self._requests.inc(1, tags={"route": route, "status": str(status)})
        self._latency.observe(ms, tags={"route": route})

    def events(self, outcome: str, n: int) -> None:
        self._events.inc(n, tags={"outcome": outcome})

    def answer(self, arm: str, version: str, ms: float, degraded: bool) -> None:
        self._arm_answers.inc(1, tags={"arm": arm, "version": version, "degraded": str(degraded).lower()})
        self._arm_latency.observe(ms, tags={"arm": arm, "version": version})

    def conversion(self, arm: str, version: str) -> None:
        self._arm_conversions.inc(1, tags={"arm": arm, "version": version})

    def arm_error(self, arm: str, version: str) -> None:
        self._arm_errors.inc(1, tags={"arm": arm, "version": version})

    def outcome(self, outcome: str, n: int) -> None:
        if n:
            self._outcomes.inc(n, tags={"outcome": outcome})
