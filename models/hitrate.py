"""The statistics of a rollout's online outcomes: a hit rate per arm with its confidence interval, the test of an
arm against the champion, and the check that the arms got the traffic they were meant to.

A hit rate is converted answers / answers (pipeline/featurestore/outcomes.py): a binomial proportion. All three
come from scipy, not from formulas of our own:

- the interval is Wilson's score interval (E. B. Wilson, "Probable inference, the law of succession, and
  statistical inference", JASA 22, 1927), `scipy.stats.binomtest(...).proportion_ci(method="wilson")`: unlike the
  normal (Wald) interval it stays inside [0, 1] and keeps close to its nominal coverage for small counts and rates
  near 0 (Agresti & Coull, "Approximate is better than 'exact'...", The American Statistician 52, 1998; Brown, Cai &
  DasGupta, Statistical Science 16, 2001);
- the test is Fisher's exact test on the 2x2 table (converted, not converted) x (arm, champion), two-sided,
  `scipy.stats.fisher_exact`. With users assigned to arms at random, it is the exact randomization test of "the
  arm makes no difference" given the table's margins (Fisher, The Design of Experiments, 1935, ch. II), so its
  false-positive rate is at most alpha (it is conservative), whatever the counts;
- the sample-ratio check is Pearson's chi-square goodness-of-fit of the answers per arm against the arms'
  weights, `scipy.stats.chisquare` (a small p-value means the assignment or the logging is broken, and no
  difference in hit rate can be trusted: Kohavi, Tang & Xu, "Trustworthy Online Controlled Experiments", 2020,
  ch. 21).

ALPHA = 0.05 is the significance level throughout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats

ALPHA = 0.05
CONFIDENCE = 0.95
TEST_NAME = "Fisher's exact test, two-sided"


@dataclass(frozen=True)
class HitRate:
    """converted / answers, with its Wilson interval at `CONFIDENCE`; NaN everywhere when there are no answers."""

    converted: int
    answers: int
    rate: float
    low: float
    high: float


def hit_rate(converted: int, answers: int, confidence: float = CONFIDENCE) -> HitRate:
    """The hit rate and its Wilson score interval (Wilson 1927, via scipy). Raises ValueError when converted is
    negative or above answers."""
    if not 0 <= converted <= max(answers, 0):
        raise ValueError(f"converted ({converted}) must be between 0 and answers ({answers})")
    if answers == 0:
        return HitRate(0, 0, math.nan, math.nan, math.nan)
    ci = stats.binomtest(converted, answers).proportion_ci(confidence_level=confidence, method="wilson")
    return HitRate(converted, answers, converted / answers, float(ci.low), float(ci.high))


@dataclass(frozen=True)
class Comparison:
    """An arm against the champion: the difference in hit rate (arm - champion), Fisher's two-sided p-value and
    whether it is below `alpha`. NaN p-value (not significant) when either side has no answers."""

    difference: float
    p_value: float
    alpha: float
    test: str = TEST_NAME

    @property
    def significant(self) -> bool:
        return bool(self.p_value < self.alpha)


def versus_champion(arm: HitRate, champion: HitRate, alpha: float = ALPHA) -> Comparison:
    """Fisher's exact test (two-sided) of arm vs champion on the 2x2 table of converted and unconverted answers."""
    if arm.answers == 0 or champion.answers == 0:
        return Comparison(math.nan, math.nan, alpha)
    table = [
        [arm.converted, arm.answers - arm.converted],
        [champion.converted, champion.answers - champion.converted],
    ]
    result = stats.fisher_exact(table, alternative="two-sided")
    return Comparison(arm.rate - champion.rate, float(result.pvalue), alpha)


def sample_ratio_p(answers: Sequence[int], weights: Sequence[float]) -> float:
    """Pearson's chi-square p-value of the answers per arm against the arms' weights (percent; arms of weight 0
    left out). NaN with fewer than two live arms or no answers."""
    live = [(n, w) for n, w in zip(answers, weights, strict=True) if w > 0]
    total = sum(n for n, _ in live)
    if len(live) < 2 or total == 0:
        return math.nan
    share = sum(w for _, w in live)
    expected = [total * w / share for _, w in live]
    return float(stats.chisquare([n for n, _ in live], expected).pvalue)
