"""Online outcomes through the Api as make_api builds it (the slice bundle, Feast on the real Redis): answers are
exposures, stored purchases convert them, a repeated event_id does not convert twice, and when the outcomes'
Redis does not answer, /recommend and /events still answer and the failure is counted."""

from __future__ import annotations

import asyncio
import socket
import uuid

import pytest
import redis

from pipeline.edge.api import Api
from pipeline.edge.schemas import RecommendRequest
from pipeline.featurestore.outcomes import Outcomes, OutcomeSettings
from pipeline.serve.args import AppArgs
from pipeline.serve.local import make_api
from pipeline.serve.metrics import NullRecorder

pytestmark = pytest.mark.integration


class Counted(NullRecorder):
    def __init__(self) -> None:
        self.outcomes: dict[str, int] = {}
        self.conversions = 0

    def outcome(self, outcome: str, n: int) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + n

    def conversion(self, arm: str, version: str) -> None:
        self.conversions += 1


@pytest.fixture(scope="module")
def api(small_bundle, slice_online, store_settings) -> Api:
    return make_api(AppArgs(bundle=small_bundle, store=store_settings, watch_store=False))


def salt(api: Api) -> str:
    return api.rollout.arms.spec.salt


def recommend(api: Api, user: str, k: int = 5) -> list[str]:
    rec = asyncio.run(api.recommend(RecommendRequest(user_id=user, k=k)))
    assert rec.arm == "champion"
    api.outcomes.flush()  # what the background flusher does every flush_s
    return [i.item_id for i in rec.items]


def converted(api: Api) -> int:
    return sum(c.converted for c in api.outcomes.counts(salt(api)))


def test_a_stored_purchase_converts_and_a_repeated_event_id_does_not_count_again(api):
    user = f"outcomes-{uuid.uuid4().hex[:8]}"
    first = recommend(api, user)
    before = converted(api)
    event = {"user_id": user, "item_id": first[0], "event_type": "purchase", "event_id": "e1"}
    assert api.events([event]) == 1
    assert converted(api) == before + 1
    # A new answer shows the same item; a retry of e1 is accepted but not stored, so it converts nothing. (The
    # purchase moves the item's rank, as history does: 50 answers keep it in view whatever the bundle.)
    again = recommend(api, user, k=50)
    assert first[0] in again
    assert api.events([event]) == 1
    assert converted(api) == before + 1
    # A new event for the same item does convert the new answer.
    assert api.events([{**event, "event_id": "e2"}]) == 1
    assert converted(api) == before + 2
    # A view converts nothing.
    recommend(api, user)
    api.events([{**event, "event_id": "e3", "event_type": "view"}])
    assert converted(api) == before + 2


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_when_the_outcomes_redis_is_down_answers_and_events_still_go_through(api):
    kept, kept_recorder = api.outcomes, api.recorder
    rec = Counted()
    dead = redis.Redis(port=dead_port(), socket_connect_timeout=0.2, socket_timeout=0.2)
    api.outcomes, api.recorder = Outcomes(dead, "test_dead", OutcomeSettings(), rec), rec
    try:
        user = f"outcomes-{uuid.uuid4().hex[:8]}"
        items = [i.item_id for i in asyncio.run(api.recommend(RecommendRequest(user_id=user, k=5))).items]
        assert len(items) == 5
        assert api.outcomes.flush() == 0 and api.outcomes.pending == 1  # kept to retry
        assert api.events([{"user_id": user, "item_id": items[0], "event_type": "purchase"}]) == 1  # accepted
        assert rec.outcomes["attribution_failed"] == 1 and rec.outcomes["flush_failed"] == 1
    finally:
        api.outcomes, api.recorder = kept, kept_recorder
