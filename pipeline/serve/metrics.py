"""The app's Prometheus metrics, recorded through Ray's metrics API: Ray's metrics agent on every node serves
them (with Ray's own) on its export port, which deploy/prometheus.yml scrapes."""

from __future__ import annotations

from chain.ports import NullRecorder

__all__ = ["CANDIDATES", "LATENCY_MS", "REQUEST_LATENCY_MS", "NullRecorder", "RayRecorder", "histogram_quantile"]

# The stages' and the chain's own times: fine below 100 ms, where the SLO lives; coarse above.
LATENCY_MS = [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 70, 80, 100, 150, 250, 500, 1000, 2500]
# A request's time as its caller sees it: no finer than 5 ms from 5 ms up, since a caller waits about 2.5 ms at p99
# that no server clock sees (HAProxy's way back, the replica's send, the client's own; client p99 minus the server's
# from HAProxy's stamp: 2.4, 2.4 and 2.9 ms in three runs of tests/pipeline/serve/test_observability_e2e.py). Finer
# buckets claim a precision no caller gets: with 2 ms ones the load generator's p99 and PromQL's were 1.8 and 1.9 ms
# apart, at the edge of the bucket's resolution.
REQUEST_LATENCY_MS = [2.5, 5, 10, 15, 20, 25, 30, 40, 50, 60, 70, 80, 100, 150, 250, 500, 1000, 2500]
CANDIDATES = [10, 25, 50, 75, 100, 150, 200, 250, 300, 400, 500]
AGREEMENT = [0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95, 1.0]  # overlap@10 moves in steps of 0.1
# Ray's histograms take positive bounds only: Kendall's tau goes out as the concordant share of pairs, (1 + tau) / 2.
CONCORDANCE = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0]
STORE_STATES = ("ok", "empty", "unreachable")  # pipeline.featurestore.recovery.StoreState


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


class RayRecorder:
    def __init__(self, version: str, topology: str) -> None:
        from ray.serve import metrics

        self._requests = metrics.Counter(
            "recserve_requests", description="HTTP requests by route and status", tag_keys=("route", "status")
        )
        self._latency = metrics.Histogram(
            "recserve_request_latency_ms",
            description="end-to-end latency on the server: from HAProxy's X-Request-Start stamp (else the ingress's "
            "receipt) to the answer",
            boundaries=REQUEST_LATENCY_MS,
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
        self._arm_errors = metrics.Counter(
            "recserve_arm_errors",
            description="/recommend answers that failed (an error, or the internal_error rung) by arm and bundle",
            tag_keys=("arm", "version"),
        )
        self._arm_candidates = metrics.Histogram(
            "recserve_arm_candidates",
            description="merged candidates per /recommend by rollout arm and bundle",
            boundaries=CANDIDATES,
            tag_keys=("arm", "version"),
        )
        self._shadow = metrics.Counter(
            "recserve_shadow_requests", description="shadow requests by outcome", tag_keys=("outcome",)
        )
        self._shadow_latency = metrics.Histogram(
            "recserve_shadow_latency_ms", description="the shadow arm's latency", boundaries=LATENCY_MS
        )
        self._shadow_overlap = metrics.Histogram(
            "recserve_shadow_overlap_at_10",
            description="overlap@10 of the shadow's answer with the caller's (share of the 10, 0-1)",
            boundaries=AGREEMENT,
        )
        self._shadow_concordance = metrics.Histogram(
            "recserve_shadow_rank_concordance",
            description="(1 + Kendall's tau-b) / 2 between the ranks the shadow's and the caller's answers give their "
            "common items: the share of concordant pairs without ties (1 the same order, 0.5 unrelated, 0 reversed)",
            boundaries=CONCORDANCE,
        )
        self._rollbacks = metrics.Counter(
            "recserve_rollbacks",
            description="canary arms rolled back by the guard, once per experiment (reason: p99, error, degraded)",
            tag_keys=("arm", "reason"),
        )
        self._share = metrics.Gauge(
            "recserve_arm_share", description="percent of users each arm serves now, in this replica", tag_keys=("arm",)
        )
        # Online outcomes (pipeline/featurestore/outcomes.py): hit rate per arm in PromQL is
        # rate(ray_recserve_arm_conversions_total) / rate(ray_recserve_arm_answers_total), summed by arm.
        self._arm_conversions = metrics.Counter(
            "recserve_arm_conversions",
            description="answers converted by an add_to_cart or purchase of a shown item within the attribution "
            "window, by rollout arm and bundle (once per answer)",
            tag_keys=("arm", "version"),
        )
        self._outcomes = metrics.Counter(
            "recserve_outcomes",
            description="outcome bookkeeping: exposures_flushed, exposures_dropped, flush_failed, attribution_failed",
            tag_keys=("outcome",),
        )
        # Requests admitted and not yet answered, per replica: what the edge compares with max_in_flight before it
        # sheds with 503 (pipeline/edge/api.py's Edge).
        self._in_flight = metrics.Gauge(
            "recserve_in_flight", description="requests in flight in this replica (work routes, admitted)"
        )
        self._in_flight.set(0)
        # One series per state, 1 for the current one: a panel and an alert read every state, even a healthy one.
        self._store = metrics.Gauge(
            "recserve_feature_store_state",
            description="the online store as this replica's watch last saw it: 1 for the current state "
            "(ok, empty, unreachable), 0 for the others (pipeline/featurestore/recovery.py)",
            tag_keys=("state",),
        )
        # Drift (chain/drift.py): per feature, over the replica's last window of requests; 0 with
        # recserve_drift_window_requests 0 until the first block of requests closes.
        self._drift_psi = metrics.Gauge(
            "recserve_drift_psi",
            description="population stability index of each blender input against the bundle's training "
            "reference, over this replica's sliding window of requests",
            tag_keys=("feature", "version"),
        )
        self._drift_js = metrics.Gauge(
            "recserve_drift_js_distance",
            description="Jensen-Shannon distance (base 2, 0-1) of each blender input against the bundle's training "
            "reference, over this replica's sliding window of requests",
            tag_keys=("feature", "version"),
        )
        self._drift_window = metrics.Gauge(
            "recserve_drift_window_requests",
            description="requests the drift gauges are computed over in this replica (0: nothing measured yet)",
            tag_keys=("version",),
        )
        self._version = version
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

    def answer(
        self, arm: str, version: str, ms: float, degraded: bool, *, error: bool = False, candidates: int = 0
    ) -> None:
        tags = {"arm": arm, "version": version}
        self._arm_answers.inc(1, tags={**tags, "degraded": str(degraded).lower()})
        self._arm_latency.observe(ms, tags=tags)
        if error:
            self._arm_errors.inc(1, tags=tags)
        else:
            self._arm_candidates.observe(candidates, tags=tags)

    def shadow(self, outcome: str, ms: float, overlap: float | None, tau: float | None) -> None:
        self._shadow.inc(1, tags={"outcome": outcome})
        if outcome in ("answered", "degraded"):
            self._shadow_latency.observe(ms)
        if overlap is not None:
            self._shadow_overlap.observe(overlap)
        if tau is not None:
            self._shadow_concordance.observe((1.0 + tau) / 2.0)

    def rollback(self, arm: str, reason: str) -> None:
        self._rollbacks.inc(1, tags={"arm": arm, "reason": reason})

    def share(self, arm: str, percent: float) -> None:
        self._share.set(percent, tags={"arm": arm})

    def conversion(self, arm: str, version: str) -> None:
        self._arm_conversions.inc(1, tags={"arm": arm, "version": version})

    def outcome(self, outcome: str, n: int) -> None:
        if n:
            self._outcomes.inc(n, tags={"outcome": outcome})

    def in_flight(self, n: int) -> None:
        self._in_flight.set(n)

    def feature_store(self, state: str) -> None:
        for known in STORE_STATES:
            self._store.set(1.0 if known == state else 0.0, tags={"state": known})

    def drift(self, feature: str, psi: float, js: float) -> None:
        tags = {"feature": feature, "version": self._version}
        self._drift_psi.set(psi, tags=tags)
        self._drift_js.set(js, tags=tags)

    def drift_window(self, requests: int) -> None:
        self._drift_window.set(requests, tags={"version": self._version})
