"""API keys at the HTTP edge: who may write events, and who may administer the service.

A client sends `Authorization: Bearer <key>`. The service holds only sha256 digests of its keys (settings.AuthSettings:
RECSERVE_API_KEYS and the file RECSERVE_API_KEYS_FILE), hashes the key presented and compares the digest with every
configured one in constant time, so neither the answer nor its timing says which key, or how much of one, matched.
Several keys are valid at once (rotation: add the new key, move the clients, delete the old line). The keys file is
read at start and again when it changes, so `recserve keys create` and a rotated Secret need no restart.

`Requires(keys, scope)` is the one check, as a FastAPI dependency: it declares the bearer scheme in the OpenAPI
spec and raises UnauthorizedError (401) or ForbiddenError (403). The key itself is never logged or kept.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Annotated

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from models.errors import ConfigError, ForbiddenError, UnauthorizedError
from settings import AuthSettings, KeyEntry

log = logging.getLogger("recserve")

SCHEME = "ApiKey"  # the security scheme's name in the OpenAPI spec
# auto_error=False: a missing or malformed header is ours to answer, in the service's error shape.
BEARER = HTTPBearer(
    scheme_name=SCHEME,
    bearerFormat="opaque key",
    description="`Authorization: Bearer <key>`. POST /events needs a key with scope events:write; /admin/* and the "
    "X-Recserve-Arm header need admin (which implies every scope). Create one with `recserve keys create`.",
    auto_error=False,
)
HOW_TO_CREATE = "`recserve keys create --name NAME --scope {scope}` on the server (or set RECSERVE_API_KEYS)"
# How often, at most, the keys file's metadata is looked at for a change (seconds).
RECHECK_S = 1.0


def digest(key: str) -> bytes:
    """sha256 of a key's UTF-8 bytes: the form in which keys are configured."""
    return hashlib.sha256(key.encode()).digest()


class KeyRing:
    """The configured keys, kept current with the keys file. Raises ConfigError at construction for a bad entry;
    a bad edit of the file later keeps the keys read before (and logs why), so a typo cannot lock everyone out."""

    def __init__(self, settings: AuthSettings | None = None, entries: tuple[KeyEntry, ...] | None = None) -> None:
        """`entries` given: exactly those keys, no file (tests, tools). Otherwise `settings` (default: from the
        environment) are read now."""
        self.settings = None if entries is not None else (settings or AuthSettings())
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        self._stamp = self._file_stamp()
        self._keys = entries if entries is not None else self._read()

    @classmethod
    def none(cls) -> KeyRing:
        """No key at all: every guarded route refuses."""
        return cls(entries=())

    def _read(self) -> tuple[KeyEntry, ...]:
        assert self.settings is not None
        return self.settings.keys()

    def _file_stamp(self) -> tuple[int, int, int] | None:
        if self.settings is None:
            return None
        try:
            st = os.stat(self.settings.api_keys_file)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    @property
    def keys(self) -> tuple[KeyEntry, ...]:
        """The keys now: re-read when the file changed (looked at once a second at most)."""
        if self.settings is not None and time.monotonic() - self._checked >= RECHECK_S:
            with self._lock:
                self._checked = time.monotonic()
                stamp = self._file_stamp()
                if stamp != self._stamp:
                    self._stamp = stamp
                    try:
                        self._keys = self._read()
                        log.warning("API keys reloaded: %d key(s)", len(self._keys))
                    except ConfigError as exc:
                        log.error("API keys not reloaded (%s); keeping the %d read before", exc, len(self._keys))
        return self._keys

    def describe(self) -> str:
        """Where keys come from, for startup output (no digests)."""
        if self.settings is None:
            return f"{len(self._keys)} key(s) given in code"
        return (
            f"{len(self.keys)} API key(s) from RECSERVE_API_KEYS and {self.settings.api_keys_file} "
            f"(names: {', '.join(k.name for k in self.keys) or 'none'})"
        )

    def match(self, key: str) -> KeyEntry | None:
        """The configured key whose digest is sha256(`key`), compared with every digest in constant time (no early
        exit, so the time taken does not depend on which key matched); None when none does."""
        presented = digest(key)
        found = None
        for entry in self.keys:
            if hmac.compare_digest(presented, entry.digest) and found is None:
                found = entry
        return found

    def authorize(self, authorization: str | None, scope: str, what: str) -> KeyEntry:
        """The key an `Authorization` header value carries, if it has `scope`. `what` names the route in messages.
        Raises UnauthorizedError (no key configured, no header, not Bearer, unknown key) or ForbiddenError."""
        fix = HOW_TO_CREATE.format(scope=scope)
        if not self.keys:
            raise UnauthorizedError(
                f"{what} needs an API key with scope {scope}, and this service has none configured: create one "
                f"with {fix}, then send it as `Authorization: Bearer <key>`"
            )
        scheme, _, key = (authorization or "").strip().partition(" ")
        if not authorization:
            raise UnauthorizedError(
                f"{what} needs an API key with scope {scope}: send `Authorization: Bearer <key>` (a key from {fix})"
            )
        if scheme.lower() != "bearer" or not key.strip():
            raise UnauthorizedError(
                f"the Authorization header is not `Bearer <key>`: send `Authorization: Bearer <key>` for {what}",
                invalid=True,
            )
        entry = self.match(key.strip())
        if entry is None:
            raise UnauthorizedError(
                f"the API key sent is not one of this service's keys (revoked, mistyped, or for another service): "
                f"send a current key for {what}, or create one with {fix}",
                invalid=True,
            )
        if not entry.allows(scope):
            raise ForbiddenError(
                f"key {entry.name!r} has scope {','.join(sorted(entry.scopes))}; {what} needs {scope}: use a key "
                f"with scope {scope}, or create one with {fix}",
                scope,
            )
        return entry


def _route(request: Request) -> str:
    return f"{request.method} {request.url.path}"


class Requires:
    """A route's guard (a FastAPI dependency): the caller's key must have `scope`. Declares the bearer scheme on
    the route's operation in the OpenAPI spec. Returns the key's entry."""

    def __init__(self, keys: Callable[[], KeyRing], scope: str) -> None:
        self.keys, self.scope = keys, scope

    def check(self, request: Request) -> KeyEntry:
        return self.keys().authorize(request.headers.get("authorization"), self.scope, _route(request))

    async def __call__(
        self, request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]
    ) -> KeyEntry:
        return self.check(request)


class RequiresWithHeader:
    """A guard that applies only when the request carries `header` (e.g. X-Recserve-Arm on /recommend, which is
    open without it): then the key must have `scope`. Returns the header's value, or None without it."""

    def __init__(self, keys: Callable[[], KeyRing], scope: str, header: str) -> None:
        self.keys, self.scope, self.header = keys, scope, header

    def check(self, request: Request) -> str | None:
        value = request.headers.get(self.header)
        if value is not None:
            what = f"{self.header} on {_route(request)}"
            self.keys().authorize(request.headers.get("authorization"), self.scope, what)
        return value

    async def __call__(self, request: Request) -> str | None:
        return self.check(request)


Guard = Requires | RequiresWithHeader
