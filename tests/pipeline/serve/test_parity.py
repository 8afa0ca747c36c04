"""Offline/online parity: the serving chain over Redis and the offline chain over the bundle, for 200 holdout users
with no session events, see the same candidates, feature rows, scores and top 10."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from chain.knobs import Knobs
from chain.offline import open_offline
from chain.recommend import Chain
from chain.runtimes import LocalStages
from chain.types import Candidates, Query, Scored
from models.bundle import load_core
from pipeline.serve.metrics import NullRecorder
from tests.conftest import SLICE_CUTOFF

pytestmark = pytest.mark.integration


def holdout_users(real_data, core, online, n: int = 200) -> list[str]:
    """Users of the bundle who bought again after its cutoff, and have no events in the store."""
    after = real_data.interactions
    after = after[after["ts"] >= SLICE_CUTOFF]["user_id"].astype(str).unique().tolist()
    known = [u for u in sorted(after) if u in core.snapshot.user_index and not len(online.user(u).realtime)]
    assert len(known) >= n
    return known[:n]


def test_serving_and_offline_chains_agree_for_200_holdout_users(real_data, small_bundle, slice_online):
    core = load_core(small_bundle)
    offline = open_offline(small_bundle)
    serving = Chain(
        core,
        slice_online,
        LocalStages(offline.cf, offline.content, offline.blend),
        Knobs(deadline_ms=10_000),
        NullRecorder(),
    )
    seen: list[tuple[Candidates, np.ndarray, Scored]] = []
    serving.trace = lambda c, x, s: seen.append((c, x, s))
    for user in holdout_users(real_data, core, slice_online):
        q = Query(user, k=10)
        live = asyncio.run(serving.recommend(q))
        cands, x, scored = seen.pop()
        r = offline.retrieve(q)
        assert np.array_equal(cands.items, r.candidates.items), user
        np.testing.assert_array_equal(cands.ranks, r.candidates.ranks)
        np.testing.assert_allclose(x, offline.hydrate(r).x, rtol=1e-6, equal_nan=True)
        np.testing.assert_allclose(scored.scores, offline.score(r).scores, rtol=1e-5, atol=1e-6)
        assert not live.degraded
        assert [i.item_id for i in live.items] == [i.item_id for i in offline.recommend(q).items], user
