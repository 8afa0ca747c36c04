"""Rollout specs and sticky assignment (chain/rollout.py): pure functions, no store or models."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from chain.rollout import Arms, ArmSpec, ArmWindow, Guard, RolloutSpec, WindowStats, agreement, assign, bucket, verdict

USERS = [str(12346 + i) for i in range(10_000)]


def spec(*arms: tuple[str, float, str], salt: str = "exp-1") -> RolloutSpec:
    return RolloutSpec(
        salt=salt,
        arms=tuple(
            ArmSpec(name=n, bundle=f"b-{n}", weight=w, role=r)  # type: ignore[arg-type]
            for n, w, r in arms
        ),
    )


@pytest.mark.parametrize(
    "weights",
    [(90.0, 10.0), (50.0, 50.0), (95.0, 5.0), (60.0, 25.0, 15.0)],
)
def test_arm_shares_are_within_one_point_of_their_weights_over_10000_users(weights):
    names = ["champion", "canary", "third"][: len(weights)]
    roles = ["champion"] + ["challenger"] * (len(weights) - 1)
    s = spec(*zip(names, weights, roles, strict=True))
    counts = dict.fromkeys(names, 0)
    for u in USERS:
        counts[assign(u, s).name] += 1
    for name, weight in zip(names, weights, strict=True):
        assert abs(100 * counts[name] / len(USERS) - weight) <= 1.0, counts


def test_a_user_stays_on_one_arm_and_a_new_salt_draws_again():
    a = spec(("champion", 50, "champion"), ("challenger", 50, "challenger"))
    first = [assign(u, a).name for u in USERS]
    assert first == [assign(u, a).name for u in USERS]  # the same on every call (and every replica: no state)
    b = spec(("champion", 50, "champion"), ("challenger", 50, "challenger"), salt="exp-2")
    moved = sum(x != assign(u, b).name for u, x in zip(USERS, first, strict=True))
    # Independent draws: about half move (binomial, sd 50 over 10,000).
    assert 4700 < moved < 5300


def test_growing_a_canary_only_moves_users_from_the_champion_to_it():
    small = spec(("champion", 95, "champion"), ("canary", 5, "canary"))
    large = spec(("champion", 80, "champion"), ("canary", 20, "canary"))
    for u in USERS:
        if assign(u, small).name == "canary":
            assert assign(u, large).name == "canary", u


def test_bucket_is_uniform_enough_and_in_range():
    points = [bucket(u, "s") for u in USERS]
    assert all(0.0 <= p < 1.0 for p in points)
    assert abs(sum(points) / len(points) - 0.5) < 0.01


@pytest.mark.parametrize(
    ("arms", "message"),
    [
        ((("a", 100, "challenger"),), "exactly one arm must have role champion"),
        ((("a", 50, "champion"), ("b", 50, "champion")), "exactly one arm must have role champion"),
        ((("a", 90, "champion"), ("b", 5, "canary")), "sum to 95, not 100"),
        ((("a", 50, "champion"), ("a", 50, "canary")), "arm names must be unique"),
    ],
)
def test_an_inconsistent_spec_is_refused_with_the_fix(arms, message):
    with pytest.raises(ValidationError, match=message):
        spec(*arms)


def test_a_zero_weight_arm_gets_no_user_and_a_forced_arm_is_served():
    s = spec(("champion", 100, "champion"), ("shadowless", 0, "challenger"))
    assert {assign(u, s).name for u in USERS[:2000]} == {"champion"}
    arms = Arms(s, {"b-champion": "chain-1", "b-shadowless": "chain-2"})
    assert arms.pick("12346", forced="shadowless") == (s.arms[1], "chain-2")
    with pytest.raises(KeyError):
        arms.pick("12346", forced="nope")


def test_a_shadow_serves_no_user_and_its_weight_is_a_share_of_requests():
    s = spec(("champion", 90, "champion"), ("canary", 10, "canary"), ("shadow", 25, "shadow"))
    assert s.shadow is not None and s.shadow.name == "shadow"
    assert {assign(u, s).name for u in USERS} == {"champion", "canary"}
    with pytest.raises(ValidationError, match="at most one arm may be the shadow"):
        spec(("champion", 100, "champion"), ("s1", 10, "shadow"), ("s2", 10, "shadow"))
    with pytest.raises(ValidationError, match="sum to 90, not 100"):
        spec(("champion", 90, "champion"), ("shadow", 10, "shadow"))


def test_an_arms_own_knobs_are_checked_and_give_it_a_chain_of_its_own():
    plain = ArmSpec(name="canary", bundle="b", weight=10, role="canary")
    chaos = ArmSpec(
        name="canary", bundle="b", weight=10, role="canary", knobs={"chaos": {"stage": "cf", "mode": "error"}}
    )
    shadow = ArmSpec(name="shadow", bundle="b", weight=10, role="shadow")
    assert len({plain.key, chaos.key, shadow.key}) == 3 and plain.key == "b"
    with pytest.raises(ValidationError, match="deadline_ms"):
        ArmSpec(name="canary", bundle="b", weight=10, knobs={"deadline_ms": -1})
    with pytest.raises(ValidationError, match="no_such_knob"):
        ArmSpec(name="canary", bundle="b", weight=10, knobs={"no_such_knob": 1})


def test_a_rolled_back_canarys_users_go_to_the_champion_and_no_one_else_moves():
    s = spec(("champion", 60, "champion"), ("canary", 20, "canary"), ("challenger", 20, "challenger"))
    chains = {"b-champion": "c1", "b-canary": "c2", "b-challenger": "c3"}
    before = Arms(s, chains)
    after = Arms(s, chains, {"canary": "p99 ..."})
    for u in USERS[:3000]:
        arm, _ = before.pick(u)
        now, chain = after.pick(u)
        assert now.name == ("champion" if arm.name == "canary" else arm.name)
        assert chain == chains[now.key]
    assert [after.weight(a) for a in s.arms] == [80.0, 0.0, 20.0]
    assert after.pick("12346", forced="canary")[0].name == "canary"  # forcing still reaches it, for a look


@pytest.mark.parametrize(
    ("canary", "champion", "expected"),
    [
        (WindowStats(500, 12.0, 0.0, 0.01), WindowStats(2000, 10.0, 0.0, 0.01), None),
        (WindowStats(500, 60.0, 0.0, 0.01), WindowStats(2000, 10.0, 0.0, 0.01), "p99"),
        (WindowStats(500, 12.0, 0.05, 0.05), WindowStats(2000, 10.0, 0.0, 0.01), "error"),
        (WindowStats(500, 12.0, 0.0, 0.20), WindowStats(2000, 10.0, 0.0, 0.01), "degraded"),
        (WindowStats(50, 500.0, 1.0, 1.0), WindowStats(2000, 10.0, 0.0, 0.01), None),  # too few to judge
    ],
)
def test_the_guard_verdict_applies_each_margin(canary, champion, expected):
    why = verdict(canary, champion, Guard())
    assert (why.partition(" ")[0] if why else None) == expected


def test_an_arm_window_keeps_only_the_window():
    w = ArmWindow()
    for i in range(200):
        w.add(float(i), ms=float(i), degraded=i % 2 == 0, error=i >= 190)
    stats = w.stats(now=199.0, window_s=99.5)  # rows 100..199
    assert stats.answers == 100
    assert stats.error_rate == pytest.approx(0.10) and stats.degraded_share == pytest.approx(0.5)
    assert 197.0 <= stats.p99_ms <= 199.0


def test_agreement_is_overlap_at_10_and_kendalls_tau_of_the_common_items():
    a = [str(i) for i in range(10)]
    assert agreement(a, a) == pytest.approx((1.0, 1.0))
    assert agreement(a, list(reversed(a))) == pytest.approx((1.0, -1.0))
    assert agreement(a, ["x", "y", *a[:8]]) == pytest.approx((0.8, 1.0))
    assert agreement(a, ["x"] * 9 + ["0"]) == (0.1, None)
