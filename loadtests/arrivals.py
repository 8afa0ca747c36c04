"""When each simulated user sends its next request: the load tests' arrival patterns, as pure functions of a rate,
a random generator and a start time (seconds). Imports no locust, so pytest can test it.

- `steady`: one request every 1/rate s from a random phase (the gate's pattern, and the default).
- `poisson-bursty`: open-loop Poisson arrivals whose rate is `factor` (2) times the base rate for `burst_s` (2 s)
  at the start of every `period_s` (10 s) of wall-clock time, and the base rate otherwise. The mean offered rate
  is then 1 + (2 - 1) * 2 / 10 = 1.2 times the base rate. `rate` everywhere (locust's --rate-per-user, the bench's
  steps) is the *base* rate.

The bursts sit at fixed wall-clock times (Unix time mod 10 s), not at each user's start, so every user's bursts
coincide and the server sees the whole pool at twice the base rate for 2 s in every 10. Each user is an
independent inhomogeneous Poisson process at its share of the rate, and a superposition of independent Poisson
processes is a Poisson process with the summed intensity (Kingman, "Poisson Processes", 1993, §2.2), so N users
at rate/N each offer exactly the pattern at `rate`.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Bursts:
    """The rate's shape over time: `factor` times the base rate for the first `burst_s` of every `period_s`
    (seconds of Unix time), 1 otherwise."""

    period_s: float = 10.0
    burst_s: float = 2.0
    factor: float = 2.0

    def __post_init__(self) -> None:
        if not (self.period_s > 0 and 0 <= self.burst_s <= self.period_s and self.factor > 0):
            raise ValueError(f"bursts need period_s > 0, 0 <= burst_s <= period_s and factor > 0: {self}")

    @property
    def mean_factor(self) -> float:
        """The mean rate over a period, as a multiple of the base rate: 1.2 for 2x during 2 s of every 10."""
        return 1.0 + (self.factor - 1.0) * self.burst_s / self.period_s

    def factor_at(self, t: float) -> float:
        """The rate at time `t` (s), as a multiple of the base rate."""
        return self.factor if t % self.period_s < self.burst_s else 1.0

    def cumulative(self, t: float) -> float:
        """Lambda(t) = the integral of factor_at from 0 to t: the expected arrivals by `t` (s) at a base rate of
        1 a second, in closed form (whole periods, then the burst and the rest of the period that has begun)."""
        periods, phase = divmod(t, self.period_s)
        in_burst = min(phase, self.burst_s)
        return periods * self.period_s * self.mean_factor + in_burst * self.factor + (phase - in_burst)

    def inverse(self, y: float) -> float:
        """The time t (s) at which cumulative(t) = y: Lambda is continuous and strictly increasing, so this is
        its inverse, piece by piece."""
        periods, rest = divmod(y, self.period_s * self.mean_factor)
        burst_mass = self.burst_s * self.factor
        phase = rest / self.factor if rest < burst_mass else self.burst_s + (rest - burst_mass)
        return periods * self.period_s + phase


BURSTS = Bursts()


def poisson_bursty(rate: float, rng: random.Random, start: float, bursts: Bursts = BURSTS) -> Iterator[float]:
    """Arrival times (s, same clock as `start`) after `start` of a Poisson process whose intensity is
    rate * bursts.factor_at(t) a second.

    Method: inversion of the cumulative intensity (the time-change method for a nonstationary Poisson process;
    Law & Kelton, "Simulation Modeling and Analysis", section on generating a nonstationary Poisson process;
    Cinlar, "Introduction to Stochastic Processes", 1975). If s_1 < s_2 < ... are the arrivals of a rate-1
    Poisson process (partial sums of Exp(1) gaps), t_i = Lambda^-1(s_i / rate) are the arrivals of the process
    with intensity rate * dLambda/dt. It is exact, one random draw an arrival, with no rejected candidates as in
    thinning (Lewis & Shedler 1979). Starting the rate-1 process at Lambda(start) is valid because it is
    memoryless.
    """
    if rate <= 0:
        raise ValueError(f"rate must be > 0 requests a second, not {rate}")

    def arrivals() -> Iterator[float]:
        s = bursts.cumulative(start) * rate
        while True:
            s += rng.expovariate(1.0)
            yield bursts.inverse(s / rate)

    return arrivals()


def steady(rate: float, rng: random.Random, start: float) -> Iterator[float]:
    """One arrival every 1/rate s (s, same clock as `start`), from a uniformly random phase in the first period:
    users spawned together then spread over the period, as independent clients do (locust's own
    constant_throughput counts the first period from the spawn, which pulls every user into one burst a
    second: p50 45 ms instead of 6 ms at 20 req/s here)."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0 requests a second, not {rate}")
    period = 1.0 / rate
    first = start + rng.random() * period
    # Multiplying, not adding period again and again, keeps float error from drifting the schedule.
    return (first + i * period for i in itertools.count())


PATTERNS: dict[str, Callable[[float, random.Random, float], Iterator[float]]] = {
    "steady": steady,
    "poisson-bursty": poisson_bursty,
}


def mean_factor(pattern: str) -> float:
    """The mean offered rate as a multiple of the base rate for a pattern name: 1 for steady, 1.2 for bursty."""
    return BURSTS.mean_factor if pattern == "poisson-bursty" else 1.0


def arrival_times(pattern: str, rate: float, seed: int, duration_s: float, start: float = 0.0) -> list[float]:
    """Every arrival (s) in [start, start + duration_s) of `pattern` at base `rate` a second, from `seed`."""
    if pattern not in PATTERNS:
        raise ValueError(f"unknown arrival pattern {pattern!r}: use one of {', '.join(PATTERNS)}")
    end = start + duration_s
    out = []
    for t in PATTERNS[pattern](rate, random.Random(seed), start):
        if t >= end:
            break
        out.append(t)
    return out
