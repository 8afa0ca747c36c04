"""Rollout specs and sticky assignment (chain/rollout.py): pure functions, no store or models."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from chain.rollout import Arms, ArmSpec, RolloutSpec, assign, bucket

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
