"""Rollouts: several bundles served side by side as arms, each user sticky to one arm.

A rollout is configuration (the Ingress's `user_config["rollout"]`): a champion, optional challengers or a canary,
each with a bundle and a weight in percent of users, and one salt for the experiment. A user's arm is a pure
function of (salt, user id), so it is the same on every replica and across restarts, and a new salt re-draws every
user independently of the last experiment (the randomization unit is the user; Kohavi, Tang & Xu, "Trustworthy
Online Controlled Experiments", 2020, ch. 14).

`Arms` is what a replica serves from: the spec and one loaded chain per bundle, swapped as a whole (one attribute
assignment), so a request sees either the old arms or the new ones, never half of each.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from chain.knobs import Knobs
from chain.types import Query, Recommendation
from models.errors import ConfigError

if TYPE_CHECKING:
    from chain.recommend import Chain

log = logging.getLogger("recserve")

Role = Literal["champion", "challenger", "canary"]
ARM_NAME = r"^[a-z][a-z0-9_-]{0,31}$"
C = TypeVar("C")


class ArmSpec(BaseModel):
    """One arm: who it serves (a weight, in percent of users) and with what (a bundle)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=ARM_NAME, description="the arm's label in answers and metrics, e.g. champion, canary")
    bundle: str = Field(min_length=1, description="bundle directory; relative paths resolve from the artifacts root")
    weight: float = Field(ge=0, le=100, description="percent of users assigned to this arm")
    role: Role = "challenger"


class RolloutSpec(BaseModel):
    """The arms of one experiment. Weights are percent of users and sum to 100; exactly one arm is the champion
    (the model a rollback returns every user to)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    salt: str = Field("default", min_length=1, max_length=64, description="one per experiment: a new salt re-draws")
    arms: tuple[ArmSpec, ...] = Field(min_length=1, max_length=8)

    @model_validator(mode="after")
    def _consistent(self) -> RolloutSpec:
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be unique, got {names}: rename the repeated one")
        champions = [a.name for a in self.arms if a.role == "champion"]
        if len(champions) != 1:
            raise ValueError(f"exactly one arm must have role champion, got {champions or 'none'}: mark one")
        total = sum(a.weight for a in self.arms)
        if abs(total - 100.0) > 1e-6:
            raise ValueError(f"the arms' weights sum to {total:g}, not 100: make them percentages of all users")
        return self

    @property
    def champion(self) -> ArmSpec:
        return next(a for a in self.arms if a.role == "champion")

    @classmethod
    def single(cls, bundle: str) -> RolloutSpec:
        """No experiment: every user on one champion."""
        return cls(arms=(ArmSpec(name="champion", bundle=bundle, weight=100.0, role="champion"),))


def bucket(user_id: str, salt: str) -> float:
    """The user's place in [0, 1) for this salt: the first 8 bytes of sha256(salt, user id), uniform and
    independent across salts. Deterministic, so every replica agrees without sharing state."""
    digest = hashlib.sha256(f"{salt}\x1f{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign(user_id: str, spec: RolloutSpec) -> ArmSpec:
    """The arm whose cumulative weight range holds the user's bucket (arms in the spec's order)."""
    point = bucket(user_id, spec.salt) * 100.0
    upto = 0.0
    live = [a for a in spec.arms if a.weight > 0]
    for arm in live:
        upto += arm.weight
        if point < upto:
            return arm
    return live[-1]  # float rounding at the top of the range


@dataclass(frozen=True)
class Arms(Generic[C]):
    """The arms a replica serves: the spec and a loaded chain per bundle (arms may share one)."""

    spec: RolloutSpec
    chains: Mapping[str, C]  # bundle (as written in the spec) -> its chain

    def pick(self, user_id: str, forced: str | None = None) -> tuple[ArmSpec, C]:
        """The user's arm and its chain; `forced` names an arm outright (testing; the edge checks who may)."""
        if forced is not None:
            arm = next((a for a in self.spec.arms if a.name == forced), None)
            if arm is None:
                raise KeyError(forced)
        else:
            arm = assign(user_id, self.spec)
        return arm, self.chains[arm.bundle]

    @property
    def champion(self) -> C:
        return self.chains[self.spec.champion.bundle]


@dataclass(frozen=True)
class SwitchState:
    """Where the replica stands with the rollout it was last given."""

    target: RolloutSpec  # the spec asked for
    serving: RolloutSpec  # the spec answering now
    error: str | None = None  # why the last switch failed, if it did (the old arms kept serving)

    @property
    def done(self) -> bool:
        return self.target == self.serving


class Rollout:
    """A replica's arms, and the switch between one set and the next without a pause.

    `apply(spec)` returns at once. In the background, each bundle the new spec names that is not loaded yet is
    loaded by `load` (off the event loop), given the current knobs and warmed on every path; then the arms are
    swapped in one assignment. A chain the new arms no longer use is released once its last in-flight request
    finishes, so a switch from one bundle to another holds both only while the new one loads and the old one
    drains. A newer spec given while a switch runs replaces the one waiting; switches run one at a time.

    `key(bundle)` names a bundle as the spec may write it in several ways (relative or absolute): the same key,
    the same chain."""

    def __init__(
        self,
        chain: Chain,
        bundle: str,
        load: Callable[[str], Awaitable[Chain]] | None = None,
        key: Callable[[str], str] = str,
    ) -> None:
        self._load, self._key = load, key
        spec = RolloutSpec.single(key(bundle))
        self.arms: Arms[Chain] = Arms(spec, {spec.champion.bundle: chain})
        self.knobs = chain.knobs
        self.state = SwitchState(spec, spec)
        self._in_flight: dict[int, int] = {}
        self._waiting: RolloutSpec | None = None
        self._task: asyncio.Task | None = None

    @property
    def champion(self) -> Chain:
        return self.arms.champion

    def chains(self) -> list[Chain]:
        return list(self.arms.chains.values())

    @contextmanager
    def using(self, chain: Chain) -> Iterator[Chain]:
        """Counts a request on `chain`, so a switch releases the chain only after the request is done."""
        self._in_flight[id(chain)] = self._in_flight.get(id(chain), 0) + 1
        try:
            yield chain
        finally:
            self._in_flight[id(chain)] -= 1

    async def recommend(self, q: Query, forced: str | None = None) -> Recommendation:
        """The answer of the user's arm (or of `forced`, an arm's name), labelled with the arm."""
        try:
            arm, chain = self.arms.pick(q.user_id, forced)
        except KeyError:
            names = ", ".join(a.name for a in self.arms.spec.arms)
            raise ConfigError(f"no arm {forced!r} in the running rollout: name one of {names}") from None
        started = time.perf_counter()
        with self.using(chain):
            rec = await chain.recommend(q)
        chain.recorder.answer(arm.name, rec.model_version, (time.perf_counter() - started) * 1000, rec.degraded)
        return replace(rec, arm=arm.name)

    def reconfigure(self, knobs: Knobs) -> None:
        self.knobs = knobs
        for chain in self.chains():
            chain.reconfigure(knobs)

    def normalized(self, spec: RolloutSpec) -> RolloutSpec:
        return spec.model_copy(
            update={"arms": tuple(a.model_copy(update={"bundle": self._key(a.bundle)}) for a in spec.arms)}
        )

    def apply(self, spec: RolloutSpec) -> None:
        """Start switching to `spec` (see the class). Raises ConfigError when this replica cannot load bundles."""
        spec = self.normalized(spec)
        if spec == self.state.target:
            return
        new = {a.bundle for a in spec.arms} - set(self.arms.chains)
        if new and self._load is None:
            raise ConfigError(
                f"this replica cannot load other bundles ({', '.join(sorted(new))}): the distributed topology "
                "serves its application's one bundle; roll out in the colocated topology, or deploy the bundle"
            )
        self.state = replace(self.state, target=spec, error=None)
        self._waiting = spec
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self._waiting is not None:
            spec, self._waiting = self._waiting, None
            try:
                await self._switch(spec)
            except Exception as exc:  # the old arms keep serving; the state says why
                log.exception("rollout switch to %s failed; the current arms keep serving", spec)
                # Done, failed: the target is what serves, so /readyz says "failed" and the same spec may be retried.
                self.state = replace(self.state, target=self.state.serving, error=f"{type(exc).__name__}: {exc}")

    async def _switch(self, spec: RolloutSpec) -> None:
        chains: dict[str, Chain] = {}
        for bundle in dict.fromkeys(a.bundle for a in spec.arms):
            chain = self.arms.chains.get(bundle)
            if chain is None:
                assert self._load is not None  # apply() refused this replica otherwise
                started = time.monotonic()
                chain = await self._load(bundle)
                chain.reconfigure(self.knobs)
                await chain.warm()
                log.info("rollout: loaded and warmed %s in %.1f s", bundle, time.monotonic() - started)
            chains[bundle] = chain
        old = self.arms
        self.arms = Arms(spec, chains)
        self.state = replace(self.state, serving=spec)
        log.info("rollout: now serving %s", [(a.name, a.weight, a.bundle) for a in spec.arms])
        for bundle, chain in old.chains.items():
            if bundle not in chains:
                while self._in_flight.get(id(chain), 0) > 0:
                    await asyncio.sleep(0.01)
                self._in_flight.pop(id(chain), None)
                log.info("rollout: released %s", bundle)
        del old

    async def wait(self, timeout_s: float = 120.0) -> SwitchState:
        """Until the switch in progress (if any) is done; the state then."""
        if self._task is not None:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        return self.state
