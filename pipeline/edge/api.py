"""The HTTP layer: routes, the one place errors become status codes, request ids, and the edge's reading of a body.

`build_api` makes a FastAPI app whose routes call whatever `Api` the getter returns, so the same app serves
inside a Ray Serve ingress replica or under plain uvicorn. Every answer that is not 2xx, the framework's own 404
and 405 included, has the body `ErrorBody` ({request_id, error, field}), and its request_id is the X-Request-ID
header's value.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from chain.knobs import Knobs
from chain.recommend import Chain
from chain.rollout import Rollout, RolloutSpec
from chain.spans import trace_id
from chain.types import Item, Recommendation
from chain.types import Query as ChainQuery
from models.data import normalize_item_id
from models.errors import (
    BodyTimeoutError,
    BodyTooLargeError,
    ConfigError,
    FeatureStoreError,
    ForbiddenError,
    IntegerTooLongError,
    InvalidEventError,
    InvalidRequestError,
    ItemNotFoundError,
    MalformedBodyError,
    MethodNotAllowedError,
    NotMaterializedError,
    OverloadedError,
    RecserveError,
    RouteNotFoundError,
    StoreUnavailableError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
    WriteConflictError,
)
from models.realtime import EventRecord
from pipeline.edge.auth import SCHEME, Guard, KeyRing, Requires, RequiresWithHeader
from pipeline.edge.schemas import (
    NON_BLANK,
    ErrorBody,
    EventsAccepted,
    EventsRequest,
    ItemOut,
    RecommendRequest,
    RecommendResponse,
    RolloutStatus,
    SimilarResponse,
)
from pipeline.edge.timing import proxy_wait_ms
from pipeline.featurestore.eventlog import EventLog
from pipeline.featurestore.events import EventSettings, EventWriter, validate_events
from pipeline.featurestore.outcomes import Outcomes
from pipeline.featurestore.recovery import StoreWatch
from pipeline.featurestore.store import REDIS_ERRORS, require_redis
from pipeline.serve.guard import CanaryGuard, LoadTurns, RollbackLedger
from pipeline.serve.metrics import NullRecorder
from pipeline.serve.request_id import given_request_id, request_id_for
from settings import StoreSettings

log = logging.getLogger("recserve")
M = TypeVar("M", bound=BaseModel)

# The one mapping from named errors to HTTP status codes. Anything else that escapes a route is a 500.
ERROR_STATUS: dict[type[RecserveError], int] = {
    MalformedBodyError: 400,
    ConfigError: 400,
    UnauthorizedError: 401,
    ForbiddenError: 403,
    RouteNotFoundError: 404,
    ItemNotFoundError: 404,
    MethodNotAllowedError: 405,
    BodyTimeoutError: 408,
    BodyTooLargeError: 413,
    UnsupportedMediaTypeError: 415,
    InvalidRequestError: 422,
    IntegerTooLongError: 422,
    InvalidEventError: 422,
    OverloadedError: 503,
    StoreUnavailableError: 503,
    WriteConflictError: 503,
    NotMaterializedError: 503,
    FeatureStoreError: 503,
}
ROUTES = {"/recommend", "/events", "/healthz", "/readyz", "/docs", "/openapi.json", "/admin/rollout"}
# Routes that do model or store work; only these count towards, and are shed at, the in-flight limit.
WORK_ROUTES = {"/recommend", "/events", "/items/similar"}
# Content-Encoding a client may send; the edge decodes it before anything reads the body.
DECODED = {"gzip", "x-gzip"}
# A refused body up to this many times the limit is still read to its end, so the connection stays usable: HAProxy
# closes a client connection whose request body was not all read, and drops the replica's `Connection: close`, so
# the client's next request on it can fail with no answer (4 and 12 in 60 after a 413 for 2 MB, measured through
# Serve's HAProxy; Go's net/http reads 256 KB past a handler for the same reason).
DRAIN_FACTOR = 4
# The header that forces a /recommend onto a rollout arm by name (testing an arm); it needs an admin key.
ARM_HEADER = "X-Recserve-Arm"


_NO_KEYS = KeyRing.none()


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
        load: Callable[[str], Awaitable[Chain]] | None = None,
        bundle_key: Callable[[str], str] = str,
        ledger: RollbackLedger | None = None,
        turns: LoadTurns | None = None,
        outcomes: Outcomes | None = None,
        settle_s: float = 0.0,
    ) -> None:
        """Once `start` runs: `watch` keeps the store's state current (and restores a lost store); `event_log`'s
        flusher drains accepted events into the hourly files (one replica at a time holds its lease). `load` makes
        the chain of another bundle, for a rollout's arms (chain/rollout.py); without it, rollouts are refused. With
        `ledger`, the canary guard runs too, and with `turns` the replicas load bundles one at a time
        (pipeline/serve/guard.py), after `settle_s` seconds a switch (AppArgs.load_settle_s). `outcomes` records
        each answer as an exposure and attributes add_to_cart/purchase events to the arm that showed the item
        (pipeline/featurestore/outcomes.py); its flusher runs from `start`."""
        self.rollout = Rollout(
            chain, str(chain.core.path), load, bundle_key, turns.turn if turns else None, settle_s=settle_s
        )
        self.watch = watch
        self.event_log = event_log
        self.ledger = ledger
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.store_settings = store_settings
        self.event_settings = event_settings
        self.known_items = frozenset(chain.snapshot.item_ids.tolist())
        self._writer_factory = writer_factory
        self._writer: EventWriter | None = None
        self._warmed = False
        self.recorder = recorder or NullRecorder()
        self.outcomes = outcomes

    def _version(self, key: str) -> str:
        chain = self.rollout.arms.chains.get(key)
        return chain.core.version if chain is not None else "loading"

    def writer(self) -> EventWriter:
        # Made on first use, so an ingress that started while Redis was down can take events once it is back.
        if self._writer is None:
            self._writer = self._writer_factory()
        return self._writer

    @property
    def chain(self) -> Chain:
        """The champion's chain: it answers everything that is not assigned to an arm (similar items, readiness)."""
        return self.rollout.champion

    async def recommend(self, body: RecommendRequest, forced: str | None = None) -> Recommendation:
        """The user's arm answers, or the arm named `forced`; raises ConfigError naming an arm not in the rollout."""
        rec = await self.rollout.recommend(
            ChainQuery(user_id=body.user_id, k=body.k, exclude=tuple(body.exclude), query=body.query), forced
        )
        self._exposed(rec)
        return rec

    def _exposed(self, rec: Recommendation) -> None:
        # Outcomes: the answer as an exposure of its arm (buffered in memory, no I/O here). Errors per arm are
        # counted where the arm answers (chain/rollout.Rollout.recommend).
        if self.outcomes is not None:
            salt = self.rollout.arms.spec.salt
            self.outcomes.exposed(salt, rec.user_id, rec.arm, rec.model_version, [i.item_id for i in rec.items])

    def _attribute(self, stored: dict[str, list[EventRecord]]) -> None:
        # Outcomes: a failure here never turns accepted events into an error; they are stored already.
        if self.outcomes is None:
            return
        try:
            self.outcomes.attribute(self.rollout.arms.spec.salt, stored)
        except REDIS_ERRORS as exc:
            self.recorder.outcome("attribution_failed", sum(map(len, stored.values())))
            log.warning("outcomes: attribution of %d users' events failed (%s)", len(stored), exc)
        except Exception:  # a bug must not fail events that are stored: counted, logged with its trace
            self.recorder.outcome("attribution_failed", sum(map(len, stored.values())))
            log.exception("outcomes: attribution of %d users' events failed", len(stored))

    def rollout_status(self) -> dict[str, Any]:
        """The running rollout: `rollout` (serving, switching, or failed: <why>), `arms` (per arm served: role,
        weight as configured, share of users now (0 once the canary guard rolled it back, with `rolled_back`: why),
        model_version, bundle), and the `serving` and `target` specs (RolloutSpec). /readyz shows `rollout` and
        `arms`; GET /admin/rollout shows all."""
        state, arms = self.rollout.state, self.rollout.arms
        return {
            "rollout": "switching" if not state.done else ("failed: " + state.error if state.error else "serving"),
            "arms": {
                a.name: {
                    "role": a.role,
                    "weight": a.weight,
                    "share": arms.weight(a),
                    "model_version": self._version(a.key),
                    "bundle": a.bundle,
                    "rolled_back": arms.rolled_back.get(a.name),
                }
                for a in state.serving.arms
            },
            "serving": state.serving,
            "target": state.target,
        }

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """The Ingress's user_config: the knobs, and an optional `rollout` (RolloutSpec) of arms to switch to.
        Raises ConfigError naming the field."""
        config = dict(user_config)
        spec = config.pop("rollout", None)
        knobs = _user_config(Knobs, config, "")
        rollout = _user_config(RolloutSpec, spec, "rollout.") if spec is not None else None
        self.rollout.reconfigure(knobs)
        if rollout is not None:
            self.rollout.apply(rollout)

    def events(self, raw: list[Any]) -> int:
        try:
            events = validate_events(raw, self.known_items, self.event_settings)
        except InvalidEventError:
            self.recorder.events("rejected", len(raw) if isinstance(raw, list) else 1)
            raise
        result = self.writer().write(events)
        self.recorder.events("accepted", result.accepted)
        self._attribute(result.stored)
        return result.accepted

    async def start(self) -> None:
        """Warm every path (the first call through each stage is slow and must not land on a customer), then start
        the store watch on the running loop. Idempotent."""
        if not self._warmed:
            for chain in self.rollout.chains():
                await chain.warm()
            self._warmed = True
        if not self._tasks:
            self._stop.clear()
            if self.watch is not None:
                self._tasks.append(asyncio.create_task(self.watch.run(self._stop)))
            if self.event_log is not None:
                self._tasks.append(asyncio.create_task(self.event_log.run_flusher(self._stop)))
            if self.ledger is not None:
                guard = CanaryGuard(self.rollout, self.ledger, self.recorder)
                self._tasks.append(asyncio.create_task(guard.run(self._stop)))
            if self.outcomes is not None:
                self._tasks.append(asyncio.create_task(self.outcomes.run_flusher(self._stop)))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        await self.start()
        rollout = self.rollout_status()
        detail: dict[str, Any] = {
            "models": "loaded",
            "model_version": self.chain.core.version,
            "arms": rollout["arms"],
            "rollout": rollout["rollout"],
            # chain/drift.py: off for a bundle trained before drift existed (it has no reference).
            "drift": "on" if self.chain.drift is not None else "off: the bundle has no drift reference; retrain it",
        }
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


def _user_config(model: type[M], value: Any, prefix: str) -> M:
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = prefix + ".".join(str(p) for p in first["loc"]) if first["loc"] else prefix.rstrip(".") or "user_config"
        raise ConfigError(
            f"user_config {field}: {first['msg']}: fix the Ingress's user_config in the serve config"
        ) from None


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


def _answer(request_id: str, exc: RecserveError) -> JSONResponse:
    """A named error as its status (ERROR_STATUS), its message and field, and its headers (Retry-After when the
    caller may retry)."""
    field = getattr(exc, "field", None)
    headers = dict(getattr(exc, "headers", None) or {})
    if getattr(exc, "retryable", False):
        headers["Retry-After"] = "1"
    return _error(request_id, status_for(exc), str(exc), field, headers or None)


_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def _validation_message(err: dict[str, Any]) -> tuple[str, str]:
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    field = ".".join(loc) or "body"
    kind = err.get("type", "")
    ctx = err.get("ctx", {})
    if kind == "json_invalid":
        return "body", f"the body is not valid JSON ({ctx.get('error', 'parse error')}): send a JSON object"
    if kind == "extra_forbidden":
        return field, f"{field!r} is not a field of this request: remove it (see /docs)"
    if kind == "missing":
        if field == "body":
            return field, "the body is empty: send a JSON object with Content-Type: application/json (see /docs)"
        return field, f"{field!r} is required"
    if field == "body" and kind in ("model_attributes_type", "dict_type", "model_type"):
        got = _JSON_TYPES.get(type(err.get("input")), "value")
        return field, f"the body is a JSON {got}, not an object: send a JSON object (see /docs)"
    if kind == "string_pattern_mismatch" and ctx.get("pattern") == NON_BLANK:
        return field, f"{field!r} is only whitespace: send the id"
    return field, f"{field}: {err.get('msg', 'invalid')} (see /docs)"


class _LongInt:
    """Stands in for an integer Python will not read (more digits than sys.get_int_max_str_digits)."""

    def __init__(self, digits: int) -> None:
        self.digits = digits


def _path_to(value: Any, bad: Callable[[Any], bool]) -> list[str | int] | None:
    """The path (keys and indexes) of the first value in a parsed JSON document for which `bad` holds."""
    stack: list[tuple[Any, list[str | int]]] = [(value, [])]
    while stack:  # iterative: a deep document must not hit the recursion limit here
        node, path = stack.pop()
        if bad(node):
            return path
        if isinstance(node, dict):
            stack.extend((child, [*path, key]) for key, child in reversed(node.items()))
        elif isinstance(node, list):
            stack.extend((node[i], [*path, i]) for i in reversed(range(len(node))))
    return None


def parse_json(body: bytes) -> Any:
    """A request body read as JSON, as strictly as the API promises: UTF-8 text holding one JSON document.

    Raises MalformedBodyError (400, field `body`) for bytes that are not UTF-8, text that is not JSON, NaN or
    Infinity, or nesting too deep to read; IntegerTooLongError (422, naming the field) for an integer of more
    digits than Python reads. (Half a surrogate pair in a string is the schema's to refuse: pydantic does.)"""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedBodyError(
            f"the body is not UTF-8: byte {exc.start} is 0x{body[exc.start]:02x}: send JSON encoded as UTF-8", "body"
        ) from None
    long_ints: list[_LongInt] = []

    def parse_int(digits: str) -> Any:
        try:
            return int(digits)
        except ValueError:  # longer than sys.get_int_max_str_digits: keep its place, to name the field below
            long_ints.append(_LongInt(len(digits.lstrip("-"))))
            return long_ints[-1]

    def parse_constant(name: str) -> Any:
        raise MalformedBodyError(f"the body holds {name}, which is not a JSON number: send a number", "body")

    try:
        value = json.loads(text, parse_int=parse_int, parse_constant=parse_constant)
    except json.JSONDecodeError as exc:
        raise MalformedBodyError(
            f"the body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}): send a JSON object",
            "body",
        ) from None
    except RecursionError:
        raise MalformedBodyError("the body is nested too deeply to read: send a flatter JSON object", "body") from None
    if long_ints:
        path = _path_to(value, lambda v: isinstance(v, _LongInt)) or []
        field = ".".join(map(str, path)) or "body"
        raise IntegerTooLongError(
            f"{field}: an integer of {long_ints[0].digits} digits is longer than the {sys.get_int_max_str_digits()} "
            "digits this service reads: send a value in the field's range (see /docs)",
            field,
        )
    return value


def _is_json(content_type: str) -> bool:
    kind = content_type.partition(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


class _JsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class _JsonRoute(APIRoute):
    """A route that reads its JSON body with `parse_json` before FastAPI does, so that each way a body can be
    unreadable gets its own named error; FastAPI answers every one of them with the same generic 400."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler
        # A route's key check comes before its body is read: a caller without the key learns nothing of the body's
        # rules (FastAPI would parse the body first). The dependency checks again; a digest costs microseconds.
        guards = [d.call for d in self.dependant.dependencies if isinstance(d.call, Guard)]

        async def read_first(request: Request) -> Response:
            for guard in guards:
                guard.check(request)
            request = _JsonRequest(request.scope, request.receive)
            if await request.body():
                kind = request.headers.get("content-type", "")
                if not _is_json(kind):
                    raise UnsupportedMediaTypeError(
                        f"the body's Content-Type is {kind or 'missing'}: send JSON with Content-Type: "
                        "application/json",
                        "Content-Type",
                    )
                await request.json()  # parsed once, here; FastAPI reads the same value
            return await handler(request)

        return read_first


class Edge:
    """Pure ASGI middleware in front of every route: request ids, reading the body (size limit 413, read deadline
    408, gzip decoded, other encodings 415), load shedding (503) and request metrics.

    The edge reads the whole body before the app sees the request, and a request counts against the in-flight
    limit only from then on, so half-sent uploads never crowd out callers whose requests have arrived. Each body
    must arrive within `body_timeout_s` of its headers (a slow or stalled sender gets 408 and the connection
    closed). A body refused before its end (413, 415) is read to its end first, up to DRAIN_FACTOR x the limit, so
    the caller's connection stays open for its next request.

    Shedding: past `max_in_flight` requests in this replica, a new one is answered 503 with Retry-After before
    any work. Each admitted request then waits behind at most that many, so overload costs some callers a fast
    retry instead of costing every caller a queue that grows for as long as the overload lasts."""

    def __init__(
        self,
        app: Any,
        max_body_bytes: Callable[[], int],
        recorder: Callable[[], Any],
        set_header: bool,
        max_in_flight: Callable[[], int],
        body_timeout_s: Callable[[], float],
        slow_request_ms: Callable[[], float] = lambda: 250.0,
    ) -> None:
        self.app = app
        self.slow_request_ms = slow_request_ms
        self.max_body_bytes = max_body_bytes
        self.recorder = recorder
        self.set_header = set_header
        self.max_in_flight = max_in_flight
        self.body_timeout_s = body_timeout_s
        self.in_flight = 0

    def request_id(self, headers: Any) -> str:
        given = given_request_id(headers)
        if not self.set_header and given:
            # Behind Serve, whose middleware echoes exactly this value on the response (request_id.py): the body
            # must carry the same, valid or not. Serve's RequestIdGate has already replaced an invalid one.
            return given
        return request_id_for(given)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # The clock starts where HAProxy stamped the request (X-Request-Start, pipeline/edge/timing.py), else here.
        waited = proxy_wait_ms(scope["headers"], time.time())
        started = time.perf_counter() - waited / 1000
        rid = self.request_id(scope["headers"])
        scope.setdefault("state", {})["request_id"] = rid
        # The trace of this request, when Serve's ingress span sampled it (the serve config's tracing_config).
        tid = trace_id()
        status = {"code": 500, "started": False}
        path = scope.get("path", "")
        route = path if path in ROUTES else ("/items/similar" if path.startswith("/items/") else "other")

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                if self.set_header:
                    # The one X-Request-ID: ours replaces any other.
                    kept = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                    message["headers"] = [*kept, (b"x-request-id", rid.encode())]
                # This request's time on the server (W3C Server-Timing, ms), what recserve_request_latency_ms
                # records: `edge` from HAProxy's stamp (or the edge) to the answer, `proxy` the part before the edge.
                took = (time.perf_counter() - started) * 1000
                timing = f"proxy;dur={waited:.2f}, edge;dur={took:.2f}".encode()
                message["headers"] = [*message.get("headers", []), (b"server-timing", timing)]
                if tid is not None:
                    message["headers"].append((b"x-trace-id", tid.encode()))
            await send(message)

        read = BodyRead()
        try:
            body = await self.read_body(scope, receive, read)
        except RecserveError as exc:
            response = _answer(rid, exc)
            stalled = isinstance(exc, BodyTimeoutError)
            if not read.ended and (stalled or not await self.drain(scope, receive, read)):
                # The rest of the body is still on its way: close the connection after the answer.
                response.headers["Connection"] = "close"
            await response(scope, receive, send_with_id)
        else:
            if body is None:
                status["code"] = 499  # the client left before its body arrived; nobody to answer
            else:
                await self.admit(scope, body, receive, send_with_id, route in WORK_ROUTES, rid, status, tid)
        took = (time.perf_counter() - started) * 1000
        try:
            recorder, slow = self.recorder(), self.slow_request_ms()
        except Exception:  # no Api yet (a replica still starting): nothing to record into
            return
        recorder.request(route, status["code"], took)
        if took >= slow:
            log.warning(
                "slow request %s %s: %d in %.1f ms request_id=%s trace_id=%s",
                scope.get("method", ""),
                path,
                status["code"],
                took,
                rid,
                tid or "-",
            )

    async def admit(
        self,
        scope: dict,
        body: bytes,
        receive: Callable,
        send: Callable,
        work: bool,
        rid: str,
        status: dict,
        tid: str | None = None,
    ) -> None:
        delivered = False

        async def replay() -> dict:
            # The body as one message; after it, the server's own receive (which reports a disconnect).
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            if work and self.in_flight >= (limit := self.max_in_flight()):
                over = f"the service is at capacity ({limit} requests in flight in this replica): retry after 1 s"
                await _answer(rid, OverloadedError(over))(scope, receive, send)
                return
            self.in_flight += work
            self.record_in_flight(work)
            try:
                await self.app(scope, replay, send)
            finally:
                self.in_flight -= work
                self.record_in_flight(work)
        except Exception:
            if status["started"]:
                raise
            log.exception("request failed request_id=%s trace_id=%s", rid, tid or "-")
            await _error(
                rid, 500, f"internal error: retry; if it persists, report request_id {rid} (the service logs it)"
            )(scope, receive, send)

    def record_in_flight(self, work: bool) -> None:
        """The in-flight gauge, on each change of a work route's count (the level shedding compares)."""
        if not work:
            return
        try:
            recorder = self.recorder()
        except Exception:  # no Api yet (a replica still starting): nothing to record into
            return
        recorder.in_flight(self.in_flight)

    async def drain(self, scope: dict, receive: Callable, read: BodyRead) -> bool:
        """Read and drop the rest of a refused body; True when it ended within DRAIN_FACTOR x the body limit and the
        body deadline (the connection can carry the next request), False otherwise."""
        cap = DRAIN_FACTOR * self.max_body_bytes()
        if (declared_length(scope["headers"]) or 0) > cap:
            return False
        try:
            async with asyncio.timeout(self.body_timeout_s()):
                while read.received <= cap:
                    if await read.take(receive) is None:
                        return False
                    if read.ended:
                        return read.received <= cap
        except TimeoutError:
            pass
        return False

    async def read_body(self, scope: dict, receive: Callable, read: BodyRead) -> bytes | None:
        """The whole body, decoded; None when the client disconnected first. `read` follows what has come of it.
        Raises BodyTooLargeError, BodyTimeoutError, UnsupportedMediaTypeError or MalformedBodyError."""
        headers = scope["headers"]
        limit, timeout = self.max_body_bytes(), self.body_timeout_s()
        length = declared_length(headers)
        if length is not None and length > limit:
            raise BodyTooLargeError(f"the body is {length} bytes; the limit is {limit}: send less", "body")
        coding = b",".join(v for k, v in headers if k == b"content-encoding").decode("latin-1")
        codings = [c.strip().lower() for c in coding.split(",") if c.strip().lower() not in ("", "identity")]
        if codings and (len(codings) > 1 or codings[0] not in DECODED):
            raise UnsupportedMediaTypeError(
                f"Content-Encoding {coding.strip()!r} is not supported: send the body as it is, or gzip-compressed "
                "with Content-Encoding: gzip",
                "Content-Encoding",
                {"Accept-Encoding": "gzip"},
            )
        chunks: list[bytes] = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    chunk = await read.take(receive)
                    if chunk is None:
                        return None
                    if read.received > limit:
                        raise BodyTooLargeError(f"the body exceeds {limit} bytes, the limit: send less", "body")
                    chunks.append(chunk)
                    if read.ended:
                        break
        except TimeoutError:
            expected = f"of {length} " if length is not None else ""
            raise BodyTimeoutError(
                f"the body did not arrive within {timeout:g} s ({read.received} bytes {expected}came): "
                "send the whole request at once, then retry",
                "body",
            ) from None
        body = b"".join(chunks)
        if codings:
            body = gunzip(body, limit)
            # What the app sees is the decoded body, so it must not be told of the encoding or the old length.
            scope["headers"] = [
                *((k, v) for k, v in headers if k not in (b"content-encoding", b"content-length")),
                (b"content-length", str(len(body)).encode()),
            ]
        return body


@dataclass
class BodyRead:
    """How far a request's body has come in: bytes received, and whether its last part has."""

    received: int = 0
    ended: bool = False

    async def take(self, receive: Callable) -> bytes | None:
        """The body's next part from the ASGI `receive`, counted here; None when the client disconnected."""
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        self.received += len(chunk)
        self.ended = not message.get("more_body", False)
        return chunk


def declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The body's Content-Length, when the request declares a valid one."""
    length = next((v for k, v in headers if k == b"content-length"), None)
    return int(length) if length is not None and length.isdigit() else None


def gunzip(data: bytes, limit: int) -> bytes:
    """A gzip body decoded, each member in turn, to at most the body limit (so a small bomb cannot grow)."""
    out: list[bytes] = []
    size = 0
    while data:
        d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            part = d.decompress(data, limit + 1 - size)
        except zlib.error as exc:
            raise MalformedBodyError(
                f"Content-Encoding is gzip, but the body is not gzip data ({exc}): compress it with gzip, or "
                "send it as it is without the header",
                "body",
            ) from None
        size += len(part)
        if size > limit or d.unconsumed_tail:
            raise BodyTooLargeError(f"the body decodes to over {limit} bytes, the limit: send less", "body")
        if not d.eof:
            raise MalformedBodyError(
                "Content-Encoding is gzip, but the gzip data ends early: send the whole compressed body", "body"
            )
        out.append(part)
        data = d.unused_data
    return b"".join(out)


def build_api(
    get: Callable[[], Api],
    max_body_bytes: int | Callable[[], int] = 1_000_000,
    set_request_id: bool = True,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None,
    body_timeout_s: float | Callable[[], float] = 5.0,
    keys: KeyRing | Callable[[], KeyRing] | None = None,
) -> FastAPI:
    """`max_body_bytes` bounds a body as sent and as decoded (413); `body_timeout_s` is the read deadline for a
    body, from its headers (408). Either may be a getter, read per request (a Serve ingress learns its args only
    once its replica starts). `set_request_id=False` behind Ray Serve: its middleware sets X-Request-ID on every
    response, and the app answers with the same value (pipeline/serve/request_id.py).

    `keys` (a KeyRing, or a getter of one) are the API keys the guarded routes accept: POST /events needs scope
    events:write, GET /admin/* and the X-Recserve-Arm header need admin (401 without a valid key, 403 without the
    scope). Default: no key, so those routes refuse everyone (closed by default); the read routes stay open."""
    fixed = keys if isinstance(keys, KeyRing) else _NO_KEYS
    ring: Callable[[], KeyRing] = keys if callable(keys) else (lambda: fixed)
    app = FastAPI(
        lifespan=lifespan,
        title="recserve",
        version="1",
        description="Ensemble recommendations (implicit ALS, MiniLM content, LightGBM LambdaRank) over Feast on Redis. "
        "Every answer that is not 2xx has the body {request_id, error, field}. Bodies are JSON in UTF-8, at most "
        "max_body_bytes (1 MB by default), as sent or gzip-compressed (Content-Encoding: gzip).",
        # FastAPI's own request span would start a second trace, its parent read from the request's headers only:
        # behind Serve the request's span is Serve's ingress span (pipeline/serve/tracing.py), the current one here.
        telemetry={"tracing": False},
    )
    app.router.route_class = _JsonRoute
    # Every status the edge or a route can answer besides 2xx, each in the one shape.
    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorBody} for code in (400, 404, 405, 408, 413, 415, 422, 500, 503)
    }
    # ... and on the guarded routes, a missing or unknown key (401) and a key without the scope (403).
    guarded = errors | {
        401: {"model": ErrorBody, "description": "no API key, or not one of this service's (WWW-Authenticate)"},
        403: {"model": ErrorBody, "description": "the API key lacks the scope this route needs"},
    }

    def rid(request: Request) -> str:
        return request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex

    def routes() -> str:
        return ", ".join(
            f"{method} {r.path}" for r in app.routes if isinstance(r, APIRoute) for method in sorted(r.methods)
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        field, message = _validation_message(errs[0]) if errs else ("body", "invalid request (see /docs)")
        if errs and errs[0].get("type") == "json_invalid":
            return _answer(rid(request), MalformedBodyError(message, field))
        return _answer(rid(request), InvalidRequestError(message, field))

    @app.exception_handler(RecserveError)
    async def named(request: Request, exc: RecserveError) -> JSONResponse:
        return _answer(rid(request), exc)

    @app.exception_handler(StarletteHTTPException)
    async def framework(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # The router's own answers (no route, wrong method), in the service's shape and with the way out.
        method, path = request.method, request.url.path
        if exc.status_code == 404:
            return _answer(rid(request), RouteNotFoundError(f"no route {path!r}: the routes are {routes()}, /docs"))
        if exc.status_code == 405:
            allow = (exc.headers or {}).get("Allow", "")
            return _answer(
                rid(request),
                MethodNotAllowedError(f"{path} takes {allow}, not {method}: send {allow}", headers={"Allow": allow}),
            )
        return _error(rid(request), exc.status_code, f"{exc.detail}: see /docs", headers=exc.headers)

    # Not a declared header parameter: a fuzzer would send arm names the running rollout does not have (400) on
    # a route that must otherwise always answer 2xx. Its key is optional, hence the `{}` requirement.
    forced_arm = RequiresWithHeader(ring, "admin", ARM_HEADER)

    @app.post(
        "/recommend",
        response_model=RecommendResponse,
        responses=guarded,
        description=f"Open to every caller. With the header `{ARM_HEADER}: <arm name>` (testing an arm), the "
        "answer comes from that arm of the running rollout, and the request needs an admin key "
        "(401 without a valid key, 403 without the scope, 400 for an arm the rollout does not have).",
        openapi_extra={"security": [{}, {SCHEME: []}]},
    )
    async def recommend(
        body: RecommendRequest, request: Request, forced: str | None = Depends(forced_arm)
    ) -> RecommendResponse:
        r = await get().recommend(body, forced=forced)
        return RecommendResponse(
            request_id=rid(request),
            user_id=r.user_id,
            model_version=r.model_version,
            arm=r.arm,
            items=_items(r.items),
            degraded=r.degraded,
            fallback_reason=r.fallback_reason,
            timings_ms=r.timings_ms,
        )

    @app.post(
        "/events",
        status_code=202,
        response_model=EventsAccepted,
        responses=guarded,
        dependencies=[Security(Requires(ring, "events:write"))],
        description="Needs an API key with scope events:write: `Authorization: Bearer <key>`.",
    )
    async def events(body: EventsRequest, request: Request) -> EventsAccepted:
        return EventsAccepted(request_id=rid(request), accepted=get().events(body.events))

    @app.get(
        "/admin/rollout",
        response_model=RolloutStatus,
        responses=guarded,
        dependencies=[Security(Requires(ring, "admin"))],
        description="The running rollout (what /readyz shows under `arms` and `rollout`, plus the serving and "
        "target specs). Needs an admin key; `recserve rollout` asks it before changing anything.",
    )
    async def admin_rollout(request: Request) -> RolloutStatus:
        api = get()
        return RolloutStatus(request_id=rid(request), model_version=api.chain.core.version, **api.rollout_status())

    @app.get("/items/{item_id}/similar", response_model=SimilarResponse, responses=errors)
    async def similar(item_id: str, request: Request, k: int = Query(10, ge=1, le=100)) -> Any:
        api = get()
        item_id = normalize_item_id(item_id)
        found = await api.chain.similar(item_id, k)
        if found is None:
            raise ItemNotFoundError(
                f"item {item_id!r} is not in the catalog of bundle {api.chain.core.version}: send a stock code "
                "of the catalog",
                "item_id",
            )
        return SimilarResponse(
            request_id=rid(request), item_id=item_id, model_version=api.chain.core.version, items=_items(found)
        )

    @app.get("/healthz", responses=errors)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses=errors)
    async def readyz(request: Request) -> JSONResponse:
        ok, detail = await get().ready()
        if ok:
            return JSONResponse({"ready": True, **detail})
        # The one error shape, with the readiness detail beside it for probes and people.
        reason = ", ".join(f"{k}: {detail[k]}" for k in ("feature_store", "redis") if k in detail) or "not ready"
        body = ErrorBody(request_id=rid(request), error=f"not ready ({reason}): see /readyz's detail; retry later")
        return JSONResponse({**body.model_dump(), "ready": False, **detail}, status_code=503)

    app.add_middleware(
        Edge,
        max_body_bytes=max_body_bytes if callable(max_body_bytes) else lambda: max_body_bytes,
        recorder=lambda: get().recorder,
        set_header=set_request_id,
        max_in_flight=lambda: get().chain.knobs.max_in_flight,
        slow_request_ms=lambda: get().chain.knobs.slow_request_ms,
        body_timeout_s=body_timeout_s if callable(body_timeout_s) else lambda: body_timeout_s,
    )
    return app
