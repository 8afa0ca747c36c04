"""The HTTP layer: routes, the one place errors become status codes, request ids and the body-size limit.

`build_api` makes a FastAPI app whose routes call whatever `Api` the getter returns, so the same app serves
inside a Ray Serve ingress replica or under plain uvicorn.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from chain.recommend import Chain
from chain.types import Item, Recommendation
from chain.types import Query as ChainQuery
from models.errors import (
    ConfigError,
    FeatureStoreError,
    InvalidEventError,
    NotMaterializedError,
    RecserveError,
    StoreUnavailableError,
    WriteConflictError,
)
from pipeline.eventlog import EventLog
from pipeline.events import EventSettings, EventWriter, validate_events
from pipeline.metrics import NullRecorder
from pipeline.recovery import StoreWatch
from pipeline.schemas import (
    ErrorBody,
    EventsAccepted,
    EventsRequest,
    ItemOut,
    RecommendRequest,
    RecommendResponse,
    SimilarResponse,
)
from pipeline.store import StoreSettings, require_redis

log = logging.getLogger("recserve")

# The one mapping from named errors to HTTP status codes.
ERROR_STATUS: dict[type[RecserveError], int] = {
    InvalidEventError: 422,
    ConfigError: 400,
    StoreUnavailableError: 503,
    WriteConflictError: 503,
    NotMaterializedError: 503,
    FeatureStoreError: 503,
}
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
ROUTES = {"/recommend", "/events", "/healthz", "/readyz", "/docs", "/openapi.json"}
# Routes that do model or store work; only these count towards, and are shed at, the in-flight limit.
WORK_ROUTES = {"/recommend", "/events", "/items/similar"}


def status_for(exc: RecserveError) -> int:
    for cls in type(exc).__mro__:
        if cls in ERROR_STATUS:
            return ERROR_STATUS[cls]
    return 400


class Api:
    """What the routes do, over one recommendation chain; plain Python, no Ray."""

    def __init__(
        self,
        chain: Chain,
        store_settings: StoreSettings,
        event_settings: EventSettings,
        writer_factory: Callable[[], EventWriter],
        recorder: Any = None,
        watch: StoreWatch | None = None,
        event_log: EventLog | None = None,
    ) -> None:
        """Once `start` runs: `watch` keeps the store's state current (and restores a lost store); `event_log`'s
        flusher drains accepted events into the hourly files (one replica at a time holds its lease)."""
        self.chain = chain
        self.watch = watch
        self.event_log = event_log
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.store_settings = store_settings
        self.event_settings = event_settings
        self.known_items = frozenset(chain.snapshot.item_ids.tolist())
        self._writer_factory = writer_factory
        self._writer: EventWriter | None = None
        self._warmed = False
        self.recorder = recorder or NullRecorder()

    def writer(self) -> EventWriter:
        # Made on first use, so an ingress that started while Redis was down can take events once it is back.
        if self._writer is None:
            self._writer = self._writer_factory()
        return self._writer

    async def recommend(self, body: RecommendRequest) -> Recommendation:
        return await self.chain.recommend(
            ChainQuery(user_id=body.user_id, k=body.k, exclude=tuple(body.exclude), query=body.query)
        )

    def events(self, raw: list[Any]) -> int:
        try:
            events = validate_events(raw, self.known_items, self.event_settings)
        except InvalidEventError:
            self.recorder.events("rejected", len(raw) if isinstance(raw, list) else 1)
            raise
        accepted = self.writer().write(events).accepted
        self.recorder.events("accepted", accepted)
        return accepted

    async def start(self) -> None:
        """Warm every path (the first call through each stage is slow and must not land on a customer), then start
        the store watch on the running loop. Idempotent."""
        if not self._warmed:
            await self.chain.warm()
            self._warmed = True
        if not self._tasks:
            self._stop.clear()
            if self.watch is not None:
                self._tasks.append(asyncio.create_task(self.watch.run(self._stop)))
            if self.event_log is not None:
                self._tasks.append(asyncio.create_task(self.event_log.run_flusher(self._stop)))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        await self.start()
        detail: dict[str, Any] = {"models": "loaded", "model_version": self.chain.core.version}
        if self.watch is not None:
            status = self.watch.status
            if status.checked_at == 0.0:
                status = await asyncio.to_thread(self.watch.check)
            detail |= {"feature_store": status.state, "redis": status.detail, "persistence": self.watch.persistence}
            if self.watch.persistence in ("none", "rdb"):
                detail["warning"] = (
                    "this Redis has no append-only persistence: a restart loses accepted events not yet flushed to "
                    "the event log's files; deploy/ensure-redis.sh starts one with appendonly yes"
                )
            return status.state == "ok", detail
        try:
            require_redis(self.store_settings)
            redis_ok, text = True, "reachable"
        except StoreUnavailableError as exc:
            redis_ok, text = False, str(exc)
        return redis_ok, detail | {"feature_store": "ok" if redis_ok else "unreachable", "redis": text}


def _items(items: list[Item]) -> list[ItemOut]:
    return [
        ItemOut(item_id=i.item_id, description=i.description, score=i.score, sources=list(i.sources), reason=i.reason)
        for i in items
    ]


def _error(
    request_id: str, status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = ErrorBody(request_id=request_id, error=message, field=field).model_dump()
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(err: dict[str, Any]) -> tuple[str, str]:
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    field = ".".join(loc) or "body"
    kind = err.get("type", "")
    if kind == "json_invalid":
        return (
            "body",
            f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')}): send a JSON object",
        )
    if kind == "extra_forbidden":
        return field, f"{field!r} is not a field of this request: remove it (see /docs)"
    if kind == "missing":
        return field, f"{field!r} is required"
    return field, f"{field}: {err.get('msg', 'invalid')}"


class Edge:
    """Pure ASGI middleware: request ids, the body-size limit (413), load shedding (503) and request metrics.

    Shedding: past `max_in_flight` requests in this replica, a new one is answered 503 with Retry-After before
    any work. Each admitted request then waits behind at most that many, so overload costs some callers a fast
    retry instead of costing every caller a queue that grows for as long as the overload lasts."""

    def __init__(
        self,
        app: Any,
        max_body_bytes: int,
        recorder: Callable[[], Any],
        set_header: bool,
        max_in_flight: Callable[[], int],
    ) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.recorder = recorder
        self.set_header = set_header
        self.max_in_flight = max_in_flight
        self.in_flight = 0

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        rid = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        status = {"code": 500}
        path = scope.get("path", "")
        route = path if path in ROUTES else ("/items/similar" if path.startswith("/items/") else "other")

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                if self.set_header:
                    message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        work = route in WORK_ROUTES
        if work and self.in_flight >= (limit := self.max_in_flight()):
            await _error(
                rid,
                503,
                f"the service is at capacity ({limit} requests in flight in this replica): retry after 1 s",
                headers={"Retry-After": "1"},
            )(scope, receive, send_with_id)
        elif length is not None and length.isdigit() and int(length) > self.max_body:
            await _error(rid, 413, f"the body is {int(length)} bytes; the limit is {self.max_body}: send less", "body")(
                scope, receive, send_with_id
            )
        else:
            received = 0

            async def counted() -> dict:
                nonlocal received
                message = await receive()
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise _TooLarge
                return message

            self.in_flight += work
            try:
                await self.app(scope, counted, send_with_id)
            except _TooLarge:
                await _error(rid, 413, f"the body exceeds {self.max_body} bytes: send less", "body")(
                    scope, receive, send_with_id
                )
            finally:
                self.in_flight -= work
        self.recorder().request(route, status["code"], (time.perf_counter() - started) * 1000)


class _TooLarge(Exception):
    pass


def build_api(
    get: Callable[[], Api],
    max_body_bytes: int = 1_000_000,
    set_request_id: bool = True,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None,
) -> FastAPI:
    """`set_request_id=False` behind Ray Serve: its proxy already echoes the caller's X-Request-ID (or makes one)
    on every response, and passes it in, so the body's request_id matches the header."""
    app = FastAPI(
        lifespan=lifespan,
        title="recserve",
        version="1",
        description="Ensemble recommendations (implicit ALS, MiniLM content, LightGBM LambdaRank) over Feast on Redis.",
    )

    def rid(request: Request) -> str:
        return request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        field, message = _validation_message(errors[0]) if errors else ("body", "invalid request")
        status = 400 if errors and errors[0].get("type") == "json_invalid" else 422
        return _error(rid(request), status, message, field)

    @app.exception_handler(RecserveError)
    async def named(request: Request, exc: RecserveError) -> JSONResponse:
        status = status_for(exc)
        field = exc.field if isinstance(exc, InvalidEventError) else None
        headers = {"Retry-After": "1"} if getattr(exc, "retryable", False) else None
        return _error(rid(request), status, str(exc), field, headers)

    @app.post("/recommend", response_model=RecommendResponse, responses={422: {"model": ErrorBody}})
    async def recommend(body: RecommendRequest, request: Request) -> RecommendResponse:
        r = await get().recommend(body)
        return RecommendResponse(
            request_id=rid(request),
            user_id=r.user_id,
            model_version=r.model_version,
            items=_items(r.items),
            degraded=r.degraded,
            fallback_reason=r.fallback_reason,
            timings_ms=r.timings_ms,
        )

    @app.post(
        "/events",
        status_code=202,
        response_model=EventsAccepted,
        responses={422: {"model": ErrorBody}, 503: {"model": ErrorBody}},
    )
    async def events(body: EventsRequest, request: Request) -> EventsAccepted:
        return EventsAccepted(request_id=rid(request), accepted=get().events(body.events))

    @app.get("/items/{item_id}/similar", response_model=SimilarResponse, responses={404: {"model": ErrorBody}})
    async def similar(item_id: str, request: Request, k: int = Query(10, ge=1, le=100)) -> Any:
        api = get()
        found = await api.chain.similar(item_id, k)
        if found is None:
            return _error(
                rid(request),
                404,
                f"item {item_id!r} is not in the catalog of bundle {api.chain.core.version}",
                "item_id",
            )
        return SimilarResponse(
            request_id=rid(request), item_id=item_id, model_version=api.chain.core.version, items=_items(found)
        )

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        ok, detail = await get().ready()
        return JSONResponse({"ready": ok, **detail}, status_code=200 if ok else 503)

    app.add_middleware(
        Edge,
        max_body_bytes=max_body_bytes,
        recorder=lambda: get().recorder,
        set_header=set_request_id,
        max_in_flight=lambda: get().chain.knobs.max_in_flight,
    )
    return app
