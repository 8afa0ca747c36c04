"""The metrics recorder as a replica makes it: Ray checks each metric's definition when it is made, not when a
cluster first scrapes it, so a bad one (say, a histogram bound Ray refuses) must fail here, not in a replica."""

from __future__ import annotations

import inspect

from chain.ports import NullRecorder
from pipeline.serve.metrics import RayRecorder


def test_every_metric_is_accepted_and_every_method_records():
    r = RayRecorder("v1", "colocated")
    r.stage("cf", 3.0)
    r.fallback("cf_timeout")
    r.candidates(120)
    r.request("/recommend", 200, 7.5)
    r.events("accepted", 2)
    r.answer("canary", "v1", 9.0, degraded=True, error=True, candidates=0)
    r.answer("champion", "v1", 5.0, degraded=False, candidates=150)
    r.shadow("answered", 6.0, 0.7, -0.4)
    r.shadow("shed", float("nan"), None, None)
    r.rollback("canary", "p99")
    r.share("canary", 0.0)


def test_the_null_recorder_takes_what_the_ray_recorder_takes():
    public = {n for n, f in inspect.getmembers(RayRecorder, inspect.isfunction) if not n.startswith("_")}
    for name in public:
        assert inspect.signature(getattr(NullRecorder, name)) == inspect.signature(getattr(RayRecorder, name)), name


def test_the_new_gauges_record_and_know_every_store_state():
    from typing import get_args

    from pipeline.featurestore.recovery import StoreState
    from pipeline.serve.metrics import STORE_STATES

    assert set(STORE_STATES) == set(get_args(StoreState))
    r = RayRecorder("v1", "colocated")
    r.in_flight(3)
    r.in_flight(0)
    for state in STORE_STATES:
        r.feature_store(state)
