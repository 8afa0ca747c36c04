"""Drift's math against hand-computed values and scipy, the reference's bins, and its round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial import distance

from models.drift import (
    CANDIDATE_COLUMNS,
    MISSING,
    OTHER,
    USER_COLUMNS,
    NumericBins,
    Reference,
    RequestFeatures,
    build_reference,
    feature_labels,
    js_distance,
    labels_of,
    psi,
    reference_counts,
    weighted_quantile_edges,
)


def test_psi_by_hand() -> None:
    e, a = np.array([0.5, 0.5]), np.array([0.8, 0.2])
    assert psi(e, a) == pytest.approx(0.3 * math.log(0.8 / 0.5) + (-0.3) * math.log(0.2 / 0.5))
    assert psi(e, e) == 0.0
    assert psi(np.array([1.0, 0.0]), np.array([0.5, 0.5])) == pytest.approx(
        -0.5 * math.log(0.5) + (0.5 - 1e-4) * math.log(0.5 / 1e-4)
    )  # the empty bin floored at 1e-4, as Evidently does


def test_js_distance_is_scipys_base_2() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        p, q = rng.random(7), rng.random(7)
        p[rng.integers(7)] = 0.0
        p, q = p / p.sum(), q / q.sum()
        assert js_distance(p, q) == pytest.approx(distance.jensenshannon(p, q, base=2), abs=1e-12)
    assert js_distance(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(1.0)


def test_weighted_quantile_edges_merge_ties() -> None:
    values = np.array([0, 0, 0, 0, 0, 0, 1, 2, 3, np.nan], dtype=float)
    edges = weighted_quantile_edges(values, np.ones(10), n_bins=4)
    # Weighted quartiles of the 9 finite values: the 3rd, 5th and 7th (0, 0, 1); the tie merges two.
    assert edges.tolist() == [0.0, 1.0]
    bins = NumericBins(edges, np.zeros(4))
    assert bins.bin_of(np.array([-1.0, 0.0, 0.5, 1.0, 5.0, np.nan])).tolist() == [0, 1, 1, 2, 2, 3]


def _request(user: float, country: str, known: bool, n: int = 3) -> RequestFeatures:
    return RequestFeatures(
        np.full(len(USER_COLUMNS), user, np.float32),
        np.full((n, len(CANDIDATE_COLUMNS)), user, np.float32),
        country,
        known,
        False,
    )


def test_build_reference_weights_and_round_trip() -> None:
    reqs = [
        (_request(float(i), "United Kingdom" if i < 8 else "France", i % 2 == 0), 1.0 + (i == 0)) for i in range(10)
    ]
    ref = build_reference(reqs, query_share=0.05)
    country = ref.categorical["user_country"]
    assert country.categories == ("United Kingdom", "France", OTHER)
    assert country.probs.tolist() == pytest.approx([9 / 11, 2 / 11, 0.0])
    assert ref.categorical["request_known_user"].probs.tolist() == pytest.approx([6 / 11, 5 / 11])
    assert ref.categorical["request_query"].probs.tolist() == pytest.approx([0.05, 0.95])
    for b in ref.numeric.values():
        assert b.probs.sum() == pytest.approx(1.0) and b.probs[-1] == 0.0  # no NaN in these rows
    again = Reference.from_json(ref.as_json())
    assert again.as_json() == ref.as_json()


def test_reference_counts_and_labels_keep_the_bins() -> None:
    rng = np.random.default_rng(0)
    reqs = [(_request(float(v), "United Kingdom", True), 1.0) for v in rng.lognormal(size=400)]
    reqs += [(_request(float("nan"), "Peru", False), 1.0) for _ in range(100)]
    ref = build_reference(reqs)
    b = ref.numeric[USER_COLUMNS[0]]
    counts = reference_counts(b.probs, 100_000)
    assert counts.sum() == 100_000 and np.abs(counts / 100_000 - b.probs).max() <= 1e-5
    assert reference_counts(np.array([1, 1, 1]) / 3, 10).tolist() == [4, 3, 3]  # largest remainder, ties: first
    values = np.array([-1.0, b.edges[0], b.edges[-1] + 1, np.nan])
    labels = labels_of(ref, USER_COLUMNS[0], values)
    names = feature_labels(ref, USER_COLUMNS[0])
    assert labels.tolist() == [names[i] for i in b.bin_of(values)] and labels[-1] == MISSING
    assert labels_of(ref, "user_country", np.array(["Peru", "Chile"])).tolist() == ["Peru", OTHER]
    assert labels_of(ref, "request_known_user", np.array(["known", "?"])).tolist() == ["known", None]
