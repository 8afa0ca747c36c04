"""The rollout statistics against published values: Wilson intervals from Newcombe (1998), Fisher's exact test on
Fisher's own tea-tasting table, and the sample-ratio check."""

from __future__ import annotations

import math

import pytest

from models.hitrate import ALPHA, hit_rate, sample_ratio_p, versus_champion


@pytest.mark.parametrize(
    ("converted", "answers", "low", "high"),
    [
        # R. G. Newcombe, "Two-sided confidence intervals for the single proportion: comparison of seven methods",
        # Statistics in Medicine 17 (1998), Table II, method 3 (Wilson score, no continuity correction).
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_the_wilson_interval_matches_newcombe_1998(converted, answers, low, high):
    h = hit_rate(converted, answers)
    assert h.rate == converted / answers
    assert (round(h.low, 4), round(h.high, 4)) == (low, high)


def test_no_answers_is_nan_and_impossible_counts_are_refused():
    h = hit_rate(0, 0)
    assert math.isnan(h.rate) and math.isnan(h.low)
    with pytest.raises(ValueError, match="between 0 and answers"):
        hit_rate(5, 4)
    assert math.isnan(versus_champion(h, hit_rate(1, 2)).p_value)
    assert not versus_champion(h, hit_rate(1, 2)).significant


def test_fishers_exact_test_matches_the_tea_tasting_table():
    # Fisher (1935): 3 of 4 cups right each way; two-sided p = 34/70 = 0.4857.
    c = versus_champion(hit_rate(3, 4), hit_rate(1, 4))
    assert c.p_value == pytest.approx(34 / 70)
    assert c.difference == pytest.approx(0.5) and not c.significant and c.alpha == ALPHA


def test_a_large_difference_is_significant_and_no_difference_is_not():
    assert versus_champion(hit_rate(300, 600), hit_rate(150, 600)).significant
    same = versus_champion(hit_rate(300, 600), hit_rate(300, 600))
    assert same.p_value == pytest.approx(1.0) and not same.significant


def test_the_sample_ratio_check():
    assert sample_ratio_p([500, 500], [50, 50]) == pytest.approx(1.0)
    assert sample_ratio_p([900, 100], [90, 10]) == pytest.approx(1.0)
    assert sample_ratio_p([600, 400], [50, 50]) < 1e-9  # 60/40 where 50/50 was meant: broken assignment
    assert math.isnan(sample_ratio_p([10], [100]))
