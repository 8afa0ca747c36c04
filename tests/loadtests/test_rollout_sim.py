"""The rollout simulation, small: the slice bundles in a Feast project of the test's own, through the real Api and
Redis attribution. Redis's counts must equal the hits the harness saw in the answers, every run must leave no
outcome keys behind, and A/A runs must not claim a difference."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from loadtests.rollout_sim import (
    Summary,
    drop_store,
    exact_aa_size,
    holdout_replay,
    make_sim_api,
    prepare_store,
    simulate,
)
from pipeline.featurestore.store import redis_client
from settings import StoreSettings
from tests.pipeline.conftest import scratch_settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sim_store(tmp_path_factory, small_bundle, second_bundle) -> Iterator[StoreSettings]:
    store = scratch_settings(tmp_path_factory.mktemp("rollout-sim"))
    prepare_store(store, [small_bundle, second_bundle])
    yield store
    drop_store(store)


def test_a_small_simulation_counts_exactly_and_aa_runs_claim_no_difference(
    sim_store, small_bundle, second_bundle, real_data
):
    replay = holdout_replay(small_bundle, real_data, users=300)
    assert len(replay.users) == 300 and all(replay.purchases[u] for u in replay.users)
    api = make_sim_api(small_bundle, sim_store)
    summary = Summary("test", {}, str(small_bundle), str(second_bundle), len(replay.users), 10, 2000.0, 0.05, "fisher")
    started = time.monotonic()
    asyncio.run(
        simulate(
            api, small_bundle, second_bundle, replay, 1, 3, 10, "smoke", summary, progress=False, assignment_salts=400
        )
    )
    took = time.monotonic() - started
    assert [r.experiment for r in summary.runs] == ["compare", "aa", "aa", "aa"]
    for run in summary.runs:
        assert sum(a.answers for a in run.arms) == 300  # one answer per user, every one counted in Redis
        for arm in run.arms:
            assert arm.converted == arm.expected  # Redis's attribution = the hits in the answers
            assert 0 <= arm.low <= arm.rate <= arm.high <= 1
        assert run.attribution_failed == 0
        assert run.events_accepted == sum(len(replay.purchases[u]) for u in replay.users)
        assert run.sample_ratio_p > 0.001  # the sticky assignment gives each arm its half
    assert {a.version for a in summary.runs[0].arms} == {"slice-v1", "slice-v2"}
    assert not any(r.significant for r in summary.of("aa"))
    # The same statistics over 400 more salts, by assignment alone: Fisher's test is exact, so at most about alpha.
    assert summary.assignment_aa is not None and summary.assignment_aa["salts"] == 400
    assert summary.assignment_aa["share_significant"] <= 0.08
    assert "hits" not in summary.as_dict()["runs"][0]
    assert 0 < summary.runs[1].arms[0].rate < 1
    # Each run cleared its salt's keys.
    client = redis_client(sim_store)
    assert not list(client.scan_iter(match=f"recserve:{sim_store.project}:outcomes:*"))
    assert took < 60, f"the smoke run took {took:.0f} s"


def test_the_exact_aa_false_positive_rate_is_at_most_alpha():
    # Fisher's test is exact (conservative) for the randomization distribution, whatever the counts.
    for users, converting in ((40, 20), (60, 51), (50, 5)):
        size = exact_aa_size(users, converting)
        assert 0.0 < size <= 0.05, (users, converting, size)
    assert exact_aa_size(40, 20, alpha=0.2) > exact_aa_size(40, 20)
