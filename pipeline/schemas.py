"""The HTTP API's request and response bodies. Unknown fields are refused, so a typo never passes silently."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecommendRequest(_Body):
    user_id: StrictStr = Field(
        min_length=1, max_length=64, description="CustomerID as text; any other id is a new user", examples=["12347"]
    )
    k: int = Field(10, ge=1, le=100, strict=True, description="how many items to return")
    exclude: list[StrictStr] = Field(default_factory=list, max_length=1000, examples=[["85123A"]])
    query: StrictStr | None = Field(None, max_length=200, description="free text that steers the content model")
    context: dict[str, Any] = Field(
        default_factory=dict, description="caller context (page, device, ...); accepted, not yet used by the models"
    )

    model_config = ConfigDict(
        extra="forbid",
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
    items: list[ItemOut]
    degraded: bool
    fallback_reason: str | None = None
    timings_ms: dict[str, float]


class EventsRequest(_Body):
    # Items are checked one by one by pipeline.events, so the error can name the event's index and field.
    events: list[Any] = Field(
        description="[{user_id, item_id, event_type: view|add_to_cart|purchase, timestamp?}]",
        examples=[[{"user_id": "12347", "item_id": "85123A", "event_type": "view"}]],
    )


class EventsAccepted(BaseModel):
    request_id: str
    accepted: int


class SimilarResponse(BaseModel):
    request_id: str
    item_id: str
    model_version: str
    items: list[ItemOut]


class ErrorBody(BaseModel):
    request_id: str
    error: str = Field(description="what failed and how to fix it")
    field: str | None = Field(None, description="the request field at fault")
