"""The load tests' arrival patterns, without locust: counts in and out of the bursts, exponential gaps, bursts
aligned to wall-clock time, and the steady schedule."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from scipy import stats

from loadtests.arrivals import BURSTS, Bursts, arrival_times, mean_factor, poisson_bursty, steady

UNIX_NOW = 1_764_400_003.7  # a start in Unix time that is not on a period boundary


def per_second(times: list[float], start: float, seconds: int) -> np.ndarray:
    """Arrivals in each whole second of Unix time from ceil(start)."""
    first = int(np.ceil(start))
    counts, _ = np.histogram(times, bins=np.arange(first, first + seconds + 1))
    return counts


def in_burst(seconds: np.ndarray) -> np.ndarray:
    return seconds % BURSTS.period_s < BURSTS.burst_s


def test_the_cumulative_rate_and_its_inverse_agree():
    for t in [0.0, 0.5, 1.999, 2.0, 2.001, 9.999, 10.0, 123.4, UNIX_NOW]:
        assert BURSTS.inverse(BURSTS.cumulative(t)) == pytest.approx(t, abs=1e-6)
    assert BURSTS.cumulative(10.0) == pytest.approx(12.0)  # 2 s at 2x + 8 s at 1x
    assert BURSTS.mean_factor == pytest.approx(1.2)
    assert mean_factor("poisson-bursty") == pytest.approx(1.2) and mean_factor("steady") == 1.0


@pytest.mark.parametrize("bad", [{"period_s": 0}, {"burst_s": 11}, {"factor": 0}])
def test_impossible_bursts_are_refused(bad):
    with pytest.raises(ValueError):
        Bursts(**bad)


def test_burst_seconds_get_twice_the_base_rate_and_the_rest_the_base_rate():
    rate, seconds = 50.0, 2000
    times = arrival_times("poisson-bursty", rate, seed=1, duration_s=seconds + 1, start=UNIX_NOW)
    counts = per_second(times, UNIX_NOW, seconds)
    secs = np.ceil(UNIX_NOW) + np.arange(seconds)
    burst, calm = counts[in_burst(secs)], counts[~in_burst(secs)]
    # Totals are Poisson: a standard deviation of sqrt(mean); allow 4 of them (a 1-in-16,000 false alarm).
    for got, per_s in ((burst, 2 * rate), (calm, rate)):
        expected = per_s * len(got)
        assert abs(got.sum() - expected) < 4 * np.sqrt(expected)
    # Poisson counts: variance = mean in each second (index of dispersion 1). Its standard error over n seconds
    # is about sqrt(2 / n): 0.035 for the 1,600 calm seconds, 0.07 for the 400 burst seconds; allow 4.
    assert calm.var() / calm.mean() == pytest.approx(1.0, abs=4 * np.sqrt(2 / len(calm)))
    assert burst.var() / burst.mean() == pytest.approx(1.0, abs=4 * np.sqrt(2 / len(burst)))
    assert len(times) / seconds == pytest.approx(1.2 * rate, rel=0.02)


def test_gaps_are_exponential_after_rescaling_time():
    # The time-rescaling theorem (Brown et al., Neural Computation 14(2), 2002): the cumulative intensity between
    # successive arrivals of an inhomogeneous Poisson process is Exp(1), i.i.d.
    rate = 30.0
    times = np.array(arrival_times("poisson-bursty", rate, seed=2, duration_s=1000, start=UNIX_NOW))
    rescaled = np.diff([BURSTS.cumulative(t) * rate for t in times])
    assert rescaled.mean() == pytest.approx(1.0, abs=0.02)
    assert rescaled.std() / rescaled.mean() == pytest.approx(1.0, abs=0.03)  # coefficient of variation
    assert stats.kstest(rescaled, "expon").pvalue > 0.001
    # Inside the calm part of a period the raw gaps are plain Exp(1/rate): CV about 1 as well.
    calm = [b - a for a, b in itertools.pairwise(times) if a // 10 == b // 10 and a % 10 >= 2]  # same calm stretch
    assert np.std(calm) / np.mean(calm) == pytest.approx(1.0, abs=0.05)


def test_users_started_apart_burst_together_and_add_up():
    users, rate, seconds = 20, 40.0, 600
    times: list[float] = []
    for u in range(users):
        start = UNIX_NOW + random.Random(u).random() * 10  # users spawn at different phases of the period
        it = poisson_bursty(rate / users, random.Random(100 + u), start)
        for t in it:
            if t >= UNIX_NOW + 11 + seconds:
                break
            times.append(t)
    counts = per_second(times, UNIX_NOW + 11, seconds)
    secs = np.ceil(UNIX_NOW + 11) + np.arange(seconds)
    burst, calm = counts[in_burst(secs)].mean(), counts[~in_burst(secs)].mean()
    assert burst == pytest.approx(2 * rate, rel=0.06) and calm == pytest.approx(rate, rel=0.04)


def test_the_same_seed_gives_the_same_arrivals():
    a = arrival_times("poisson-bursty", 10.0, seed=7, duration_s=60)
    assert a == arrival_times("poisson-bursty", 10.0, seed=7, duration_s=60)
    assert a != arrival_times("poisson-bursty", 10.0, seed=8, duration_s=60)
    assert all(0.0 <= t < 60 for t in a) and a == sorted(a)


def test_steady_sends_one_request_a_period_from_a_random_phase():
    times = arrival_times("steady", 4.0, seed=3, duration_s=100, start=UNIX_NOW)
    assert UNIX_NOW <= times[0] < UNIX_NOW + 0.25
    assert np.diff(times) == pytest.approx(np.full(len(times) - 1, 0.25))
    assert len(times) in (399, 400)
    firsts = {next(steady(4.0, random.Random(s), 0.0)) for s in range(20)}
    assert len(firsts) == 20  # independent phases, not one burst


@pytest.mark.parametrize("pattern", ["steady", "poisson-bursty"])
def test_rates_must_be_positive(pattern):
    with pytest.raises(ValueError):
        arrival_times(pattern, 0.0, seed=0, duration_s=1)


def test_an_unknown_pattern_names_the_known_ones():
    with pytest.raises(ValueError, match="steady, poisson-bursty"):
        arrival_times("uniform", 1.0, seed=0, duration_s=1)
