"""The HTTP API's request and response bodies. Unknown fields are refused, so a typo never passes silently.

Ids from clients are checked as sent (the OpenAPI schema says exactly what is refused), then normalized the way
the data is cleaned (models/data.py): `' 85123a'` is product 85123A in `exclude`, in events and in
`/items/{item_id}/similar`.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictStr, field_validator

from chain.rollout import Role, RolloutSpec
from models.data import normalize_item_id, normalize_user_id
from models.realtime import EventType

# At least one character that is not whitespace: an id of blanks is empty once trimmed. The models use Python's
# regex engine, so `\S` means what str.strip means by whitespace (Rust's engine, pydantic's default, counts a few
# control characters differently), which is also what the schema's fuzzers generate against.
NON_BLANK = r"\S"

UserId = Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=NON_BLANK), AfterValidator(normalize_user_id)]
ItemId = Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=NON_BLANK), AfterValidator(normalize_item_id)]


def _whole(value: Any) -> Any:
    # JSON Schema counts 1.0 as an integer; pydantic's strict int does not. Strings and booleans stay refused.
    return int(value) if isinstance(value, float) and value.is_integer() else value


# Excluded ids are only compared, so any string is allowed; normalized like every other item id.
ExcludedId = Annotated[StrictStr, AfterValidator(normalize_item_id)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", regex_engine="python-re")


class RecommendRequest(_Body):
    user_id: UserId = Field(description="CustomerID as text (trimmed); any other id is a new user", examples=["12347"])
    k: Annotated[int, BeforeValidator(_whole)] = Field(
        10, ge=1, le=100, strict=True, description="how many items to return"
    )
    exclude: list[ExcludedId] = Field(
        default_factory=list, max_length=1000, description="item ids never to return", examples=[["85123A"]]
    )
    query: StrictStr | None = Field(None, max_length=200, description="free text that steers the content model")
    context: dict[str, Any] = Field(
        default_factory=dict, description="caller context (page, device, ...); accepted, not yet used by the models"
    )

    model_config = ConfigDict(
        extra="forbid",
        regex_engine="python-re",
        json_schema_extra={"examples": [{"user_id": "12347", "k": 10, "exclude": ["85123A"]}]},
    )


class ItemOut(BaseModel):
    item_id: str = Field(examples=["22423"])
    description: str = Field(examples=["REGENCY CAKESTAND 3 TIER"])
    score: float
    sources: list[str] = Field(examples=[["cf", "history"]])
    reason: str = Field(examples=["bought together with jumbo bag red retrospot"])


class RecommendResponse(BaseModel):
    request_id: str
    user_id: str
    model_version: str
    arm: str = Field(description="the rollout arm that answered: the user's, sticky across requests and replicas")
    items: list[ItemOut]
    degraded: bool
    fallback_reason: str | None = None
    timings_ms: dict[str, float]


class Event(BaseModel):
    """One event as a client sends it; pipeline.featurestore.events checks a batch of them one by one."""

    model_config = ConfigDict(extra="forbid", frozen=True, regex_engine="python-re")

    user_id: UserId = Field(examples=["12347"])
    item_id: ItemId = Field(examples=["85123A"])
    event_type: EventType = Field(examples=["view"])
    timestamp: dt.datetime | None = Field(None, description="ISO 8601; UTC when no zone is given; default: now")
    event_id: StrictStr | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="the client's id for this event: a repeat within the retention window (24 h by default) is "
        "accepted and counted once, so a batch can be retried safely; ids are per user",
        examples=["3f1c9a4e-view-1"],
    )

    @field_validator("timestamp", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        # pydantic would also take a number as Unix time; the API says ISO 8601 text, and a number is more likely
        # milliseconds sent by mistake than seconds.
        if value is not None and not isinstance(value, str):
            raise ValueError(f"must be ISO 8601 text such as 2026-11-29T12:00:00Z, got {type(value).__name__}")
        return value


class EventsRequest(_Body):
    # Items are checked one by one by pipeline.featurestore.events, so the error can name the event's index and
    # field; the schema still shows each item's shape.
    events: list[Any] = Field(
        description="[{user_id, item_id, event_type: view|add_to_cart|purchase, timestamp?, event_id?}]",
        examples=[[{"user_id": "12347", "item_id": "85123A", "event_type": "view", "event_id": "3f1c9a4e-view-1"}]],
        json_schema_extra={"items": Event.model_json_schema(), "minItems": 1},
    )


class EventsAccepted(BaseModel):
    request_id: str
    accepted: int = Field(description="events accepted, repeats of an event_id included (each is stored once)")


class SimilarResponse(BaseModel):
    request_id: str
    item_id: str = Field(description="the item asked about, normalized (trimmed, upper-case)")
    model_version: str
    items: list[ItemOut]


class ArmOut(BaseModel):
    role: Role
    weight: float = Field(description="percent of users assigned to this arm (a shadow's: of requests mirrored)")
    share: float = Field(description="percent of users it serves now: 0 once the canary guard rolled it back")
    model_version: str = Field(description="the arm's bundle version; `loading` while a switch loads it")
    bundle: str
    rolled_back: str | None = Field(None, description="why the canary guard rolled it back, if it did")


class RolloutStatus(BaseModel):
    """GET /admin/rollout: the running rollout of the replica that answered."""

    request_id: str
    model_version: str = Field(description="the champion's bundle version")
    rollout: str = Field(description="serving, switching, or `failed: <why>` (the old arms kept serving)")
    arms: dict[str, ArmOut] = Field(description="the arms served now, by name (as /readyz shows them)")
    serving: RolloutSpec = Field(description="the spec answering now")
    target: RolloutSpec = Field(description="the spec asked for; differs from `serving` while switching")


class ErrorBody(BaseModel):
    """Every answer that is not 2xx."""

    request_id: str = Field(description="the same value as the X-Request-ID response header")
    error: str = Field(description="what failed and how to fix it")
    field: str | None = Field(None, description="the request field (or header) at fault; null: the whole request")
