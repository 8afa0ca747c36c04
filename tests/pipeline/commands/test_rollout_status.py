"""`recserve rollout status` without Ray: the report from Redis's outcome counts (a project of the test's own) and
the metrics' per-arm figures, its statistics against scipy's own, the table and the JSON."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator

import pytest
from scipy import stats

from chain.rollout import ArmSpec, RolloutSpec
from pipeline.commands.rollout import outcome_counts, render, status_report
from pipeline.featurestore.outcomes import Outcomes
from pipeline.featurestore.store import redis_client
from settings import StoreSettings

SPEC = RolloutSpec(
    salt="exp-1",
    arms=(
        ArmSpec(name="champion", role="champion", weight=50, bundle="/b/v1"),
        ArmSpec(name="challenger", role="challenger", weight=50, bundle="/b/v2"),
    ),
)
SERVING = {"champion": {"model_version": "v1"}, "challenger": {"model_version": "v2"}}
STATS = {
    "champion": {"answers": 610.0, "degraded": 0.01, "errors": 0.0, "p50": 8.2, "p99": 17.0},
    "challenger": {"answers": 590.0, "degraded": 0.02, "errors": 0.005, "p50": 9.0, "p99": 19.5},
}


@pytest.fixture
def store() -> Iterator[StoreSettings]:
    settings = StoreSettings(project=f"test_{uuid.uuid4().hex[:12]}")
    yield settings
    client = redis_client(settings)
    keys = list(client.scan_iter(match=f"recserve:{settings.project}:*"))
    if keys:
        client.delete(*keys)


def fill(store: StoreSettings, arm: str, version: str, answers: int, converted: int) -> None:
    """Real exposures and conversions through Outcomes, as the replicas make them."""
    from models.realtime import EventRecord

    o = Outcomes(redis_client(store), store.project)
    for i in range(answers):
        o.exposed(SPEC.salt, f"{arm}-u{i}", arm, version, ["A"], now_ms=1_000)
    o.flush()
    o.attribute(SPEC.salt, {f"{arm}-u{i}": [EventRecord("A", "purchase", 2_000)] for i in range(converted)})


def test_the_report_reads_redis_and_its_statistics_are_scipys(store):
    fill(store, "champion", "v1", 600, 300)
    fill(store, "challenger", "v2", 600, 350)
    fill(store, "challenger", "v0", 40, 40)  # an older version of the arm under the same salt: not counted
    report = status_report(SPEC, SERVING, STATS, outcome_counts(store, SPEC.salt))
    champ, chal = report["arms"]
    assert (champ["answers"], champ["conversions"], chal["answers"], chal["conversions"]) == (600, 300, 600, 350)
    assert champ["observed_share"] == pytest.approx(0.5) and chal["target_share"] == 0.5
    ci = stats.binomtest(350, 600).proportion_ci(confidence_level=0.95, method="wilson")
    assert chal["hit_rate"] == pytest.approx(350 / 600)
    assert chal["hit_rate_ci95"] == pytest.approx([ci.low, ci.high])
    p = stats.fisher_exact([[350, 250], [300, 300]]).pvalue
    assert chal["vs_champion"]["p_value"] == pytest.approx(p) and p < 0.05
    assert chal["vs_champion"]["significant"] and chal["vs_champion"]["difference"] == pytest.approx(50 / 600)
    assert champ["vs_champion"] is None
    assert (chal["requests"], chal["p99_ms"], chal["error_rate"]) == (590.0, 19.5, 0.005)
    assert report["sample_ratio_p"] == pytest.approx(1.0)
    assert report["test"].startswith("Fisher") and report["alpha"] == 0.05
    text = render(report)
    assert "challenger" in text and "v2" in text and "significant" in text and "p=" in text
    assert "0.583 [" in text  # the challenger's hit rate and interval
    assert json.loads(json.dumps(report)) == report  # the --json form: plain JSON, no NaN


def test_without_answers_or_redis_the_report_says_so_instead_of_failing():
    dead = StoreSettings(project="test_dead", redis="127.0.0.1:1", connect_timeout_s=0.2)
    counts = outcome_counts(dead, SPEC.salt)
    assert isinstance(counts, str) and "did not answer" in counts
    report = status_report(SPEC, {}, {}, counts, "unreachable (0)")
    assert all(a["answers"] == 0 and a["hit_rate"] is None for a in report["arms"])
    assert report["arms"][1]["vs_champion"]["p_value"] is None
    assert report["sample_ratio_p"] is None or not math.isnan(report["sample_ratio_p"])
    text = render(report)
    assert "outcomes unavailable" in text and "no data" in text
