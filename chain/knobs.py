"""Runtime knobs: the serve config's user_config; `reconfigure` applies a change without a restart."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Chaos(BaseModel):
    """Fault injection for drills: make one stage fail or stall."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: str = Field(pattern="^(cf|content|blend)$")
    mode: str = Field(pattern="^(error|delay)$")
    delay_ms: float = Field(200.0, ge=0)


class Knobs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    deadline_ms: float = Field(80.0, gt=0, le=10_000, description="the whole request's budget")
    retrieval_share: float = Field(
        0.5, gt=0, lt=1, description="CF and content must answer within this share (content, with a query: blend_share)"
    )
    blend_share: float = Field(0.85, gt=0, lt=1, description="the blender must answer within this share")
    n_cf: int | None = Field(None, ge=1, le=1000, description="default: the bundle's training setting")
    n_content: int | None = Field(None, ge=1, le=1000)
    n_history: int | None = Field(None, ge=1, le=1000)
    n_popular: int | None = Field(None, ge=1, le=1000)
    n_query: int = Field(
        50, ge=1, le=1000, description="with a query: its content matches the answer is drawn from (at least 2k)"
    )
    session_events: int = Field(20, ge=0, le=1000, description="recent events that steer CF and content")
    feature_store_retry_s: float = Field(1.0, ge=0, description="after a Redis failure, serve from the bundle")
    breaker_failures: int = Field(
        3, ge=1, le=1000, description="a stage that fails or misses its deadline this many times in a row is skipped"
    )
    breaker_open_s: float = Field(
        1.0, ge=0, le=600, description="for this long; then one request tries it again (a circuit breaker)"
    )
    max_in_flight: int = Field(
        32, ge=1, le=100_000, description="past this many requests in the replica, answer 503 + Retry-After at once"
    )
    chaos: Chaos | None = Field(None, description="fault injection for drills: make one stage fail or stall")
    slow_request_ms: float = Field(
        250.0,
        ge=0,
        description="a request that takes longer at the ingress (ms) is logged with its request id and trace id",
    )
