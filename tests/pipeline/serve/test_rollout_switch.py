"""Rollouts in one replica, without Ray: the Api as make_api builds it (the colocated Ingress's), two real bundles
of the same slice materialized in the session's Feast project, arms switched under concurrent requests."""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import shutil
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import pytest

from chain.rollout import ArmSpec, RolloutSpec, assign
from pipeline.edge.api import Api
from pipeline.edge.schemas import RecommendRequest
from pipeline.serve.args import AppArgs
from pipeline.serve.local import make_api

pytestmark = pytest.mark.integration
USERS = [str(u) for u in range(12346, 12446)] + [f"new-{i}" for i in range(10)]


@pytest.fixture
def api(small_bundle, slice_online, second_bundle, second_online, store_settings) -> Api:
    return make_api(AppArgs(bundle=small_bundle, store=store_settings, watch_store=False))


def only(bundle: Path) -> dict:
    return {"rollout": RolloutSpec.single(str(bundle)).model_dump(mode="json")}


@dataclass(frozen=True)
class Answer:
    started: float
    ended: float
    user: str
    version: str
    arm: str


async def traffic(api: Api, stop: asyncio.Event, out: list[Answer], errors: list[BaseException], worker: int) -> None:
    i = worker
    while not stop.is_set():
        user = USERS[i % len(USERS)]
        i += 7
        started = time.monotonic()
        try:
            r = await api.recommend(RecommendRequest(user_id=user, k=5))
        except Exception as exc:
            errors.append(exc)
            continue
        out.append(Answer(started, time.monotonic(), user, r.model_version, r.arm))
        await asyncio.sleep(0)


def test_ten_switches_under_traffic_fail_nothing_and_versions_change_only_at_a_switch(api, small_bundle, second_bundle):
    async def scenario() -> tuple[list[Answer], list[BaseException], list[tuple[float, float, str]]]:
        await api.start()
        stop, out, errors = asyncio.Event(), [], []
        workers = [asyncio.create_task(traffic(api, stop, out, errors, w)) for w in range(4)]
        await asyncio.sleep(0.3)
        switches = []  # (asked at, live at, version now served)
        for n in range(10):
            bundle, version = (second_bundle, "slice-v2") if n % 2 == 0 else (small_bundle, "slice-v1")
            asked = time.monotonic()
            api.reconfigure(only(bundle))
            state = await api.rollout.wait(timeout_s=120)
            assert state.done and state.error is None, state
            switches.append((asked, time.monotonic(), version))
            await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*workers)
        await api.stop()
        return out, errors, switches

    answers, errors, switches = asyncio.run(scenario())
    assert errors == []
    assert len(answers) > 200
    # Between one switch going live and the next being asked for, every answer is the live bundle's.
    windows = [
        (live, switches[i + 1][0] if i + 1 < len(switches) else float("inf"), v)
        for i, (_, live, v) in enumerate(switches)
    ]
    checked = 0
    for a in answers:
        for live, next_asked, version in windows:
            if a.started >= live and a.ended <= next_asked:
                assert a.version == version, (a, version)
                checked += 1
    assert checked > 100
    # Each user's answers change version only across a switch: never back and forth within one.
    for user in USERS:
        seq = [a for a in sorted(answers, key=lambda a: a.started) if a.user == user]
        for before, after in itertools.pairwise(seq):
            if before.version != after.version:  # a switch was under way between the two
                assert any(asked <= after.ended and live >= before.started for asked, live, _ in switches), (
                    before,
                    after,
                )


def test_a_released_bundle_is_freed_by_reference_counting_alone(api, second_bundle):
    """gc.freeze() at start hides the first bundle from the cyclic GC, so its release must not need one."""

    async def scenario() -> weakref.ref:
        await api.start()
        old = weakref.ref(api.chain.core)
        api.reconfigure(only(second_bundle))
        await api.rollout.wait(timeout_s=120)
        await api.stop()
        return old

    gc.disable()
    try:
        old = asyncio.run(scenario())
        assert old() is None, gc.get_referrers(old())
    finally:
        gc.enable()


def test_an_ab_rollout_serves_each_user_their_sticky_arm(api, small_bundle, second_bundle):
    spec = RolloutSpec(
        salt="ab-test",
        arms=(
            ArmSpec(name="champion", bundle=str(small_bundle), weight=50, role="champion"),
            ArmSpec(name="challenger", bundle=str(second_bundle), weight=50),
        ),
    )

    async def scenario() -> list[tuple[str, str, str]]:
        await api.start()
        api.reconfigure({"rollout": spec.model_dump(mode="json")})
        await api.rollout.wait(timeout_s=120)
        got = []
        for _ in range(2):
            for user in USERS:
                r = await api.recommend(RecommendRequest(user_id=user, k=5))
                got.append((user, r.arm, r.model_version))
        _, detail = await api.ready()
        await api.stop()
        assert {name: (a["role"], a["weight"], a["model_version"]) for name, a in detail["arms"].items()} == {
            "champion": ("champion", 50.0, "slice-v1"),
            "challenger": ("challenger", 50.0, "slice-v2"),
        }
        return got

    got = asyncio.run(scenario())
    versions = {"champion": "slice-v1", "challenger": "slice-v2"}
    for user, arm, version in got:
        assert arm == assign(user, spec).name and version == versions[arm]
    assert {arm for _, arm, _ in got} == {"champion", "challenger"}


def test_a_bundle_not_in_the_feature_store_is_refused_and_the_old_arms_keep_serving(api, small_bundle, tmp_path):
    copy = tmp_path / "unmaterialized"
    shutil.copytree(small_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["version"] = "slice-never-materialized"
    (copy / "manifest.json").write_text(json.dumps(manifest))

    async def scenario() -> tuple[str | None, str, str]:
        await api.start()
        api.reconfigure(only(copy))
        state = await api.rollout.wait(timeout_s=120)
        r = await api.recommend(RecommendRequest(user_id="12347", k=5))
        await api.stop()
        return state.error, r.model_version, r.arm

    error, version, arm = asyncio.run(scenario())
    assert error is not None and "recserve features materialize" in error, error
    assert (version, arm) == ("slice-v1", "champion")


def test_a_bad_rollout_in_user_config_names_the_field(api):
    from models.errors import ConfigError

    with pytest.raises(ConfigError, match=r"user_config rollout.arms.*weight|sum to 90"):
        api.reconfigure({"rollout": {"arms": [{"name": "champion", "bundle": "x", "weight": 90, "role": "champion"}]}})
