"""The request id rule, for the app and for Ray Serve's own HTTP servers (stdlib and Starlette only, since Serve's
proxy imports it too).

A caller's X-Request-ID is kept when it is a plain token (letters, digits and `. _ : -`, at most 128); any other
value, or none, is replaced by a fresh id. The response header and the body's `request_id` always carry the same
value:
- under plain uvicorn the app's `Edge` sets the header itself, replacing whatever else would be sent;
- behind Ray Serve, Serve's RequestIdMiddleware echoes the x-request-id it finds on the request (or one it makes)
  on every response, after the app has answered (ray/serve/_private/http_util.py, in the proxy and in each
  replica's direct-ingress server). `RequestIdGate`, which `recserve serve` installs in front of it through
  RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=pipeline.serve.request_id:serve_middlewares, replaces a caller's invalid
  id on the request first, so Serve echoes the value the app answers with.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from starlette.middleware import Middleware

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
HEADER = b"x-request-id"


def given_request_id(headers: Any) -> str:
    """The first X-Request-ID of ASGI headers ([(name, value)], names lower-case), or ''."""
    return next((v.decode("latin-1") for k, v in headers if k == HEADER), "")


def request_id_for(given: str) -> str:
    """The caller's id when it is a plain token; otherwise a fresh one (32 hex digits)."""
    return given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


class RequestIdGate:
    """Pure ASGI middleware: the request leaves with exactly one valid X-Request-ID (the caller's or a fresh one)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            given = given_request_id(scope["headers"])
            rid = request_id_for(given)
            if rid != given or sum(k == HEADER for k, _ in scope["headers"]) > 1:
                scope["headers"] = [(k, v) for k, v in scope["headers"] if k != HEADER] + [(HEADER, rid.encode())]
        await self.app(scope, receive, send)


def serve_middlewares() -> list[Middleware]:
    """Ray Serve's HTTP proxy callback: middlewares that wrap Serve's own, on every HTTP server it starts."""
    return [Middleware(RequestIdGate)]
