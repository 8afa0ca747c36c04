"""The benchmark's arithmetic: latency quantiles recovered from Prometheus histogram buckets."""

from __future__ import annotations

import numpy as np
import pytest

from loadtests.bench import stage_quantiles
from pipeline.serve.metrics import LATENCY_MS
from pipeline.serve.metrics import histogram_quantile as quantile

BOUNDS = [*map(float, LATENCY_MS), float("inf")]


def cumulative(samples: np.ndarray) -> list[tuple[float, float]]:
    return [(le, float((samples <= le).sum())) for le in BOUNDS]


@pytest.mark.parametrize("q", [0.5, 0.9, 0.99])
def test_quantiles_from_buckets_land_within_the_bucket_of_the_true_quantile(q):
    samples = np.random.default_rng(0).gamma(2.0, 4.0, 20_000)  # a latency-like long tail, mostly 2-30 ms
    true = float(np.quantile(samples, q))
    estimate = quantile(cumulative(samples), q)
    upper = next(b for b in BOUNDS if b >= true)
    lower = max([0.0, *(b for b in BOUNDS if b < true)])
    assert lower <= estimate <= upper


def test_stage_quantiles_use_only_what_a_step_added():
    def scrape(samples: dict[str, np.ndarray]) -> dict[tuple[str, str, float], float]:
        return {("stage", name, le): n for name, s in samples.items() for le, n in cumulative(s)}

    slow, fast = np.full(1000, 90.0), np.full(1000, 2.5)
    before = scrape({"blend": slow})
    after = scrape({"blend": np.concatenate([slow, fast])})
    got = stage_quantiles(before, after)["blend"]
    assert got["n"] == 1000 and 2.0 <= got["p50"] <= 3.0 and got["p99"] <= 3.0


def test_an_empty_histogram_has_no_quantile():
    assert np.isnan(quantile([(1.0, 0.0), (float("inf"), 0.0)], 0.5))


def test_the_summary_line_parses_with_and_without_late_sends():
    from loadtests.systems import SUMMARY

    now = (
        "SLO gate PASS: requests 715, failures 0, p50 2 ms, p95 43 ms, p99 49 ms, rps 23.7, degraded 0.0000, shed 0, "
        "answered p99 49 ms, late 1, arrival poisson-bursty"
    )
    found = SUMMARY.search(f"locust output\n{now} (p99 120 ms > 100 ms)\n")
    assert found and found.group(0) == now and found["late"] == "1" and found["arrival"] == "poisson-bursty"
    before = now.split(", late")[0]  # what the locustfile printed before it counted late sends
    found = SUMMARY.search(before)
    assert found and found["late"] is None and found["p99"] == "49"
