"""API keys for tests and drills, made as `recserve keys create` makes them: a random key and its digest entry."""

from __future__ import annotations

from pipeline.commands.keys import generate
from pipeline.edge.auth import KeyRing
from settings import parse_keys


def new_key(name: str = "test", scopes: str = "events:write") -> tuple[str, str]:
    """(key, entry): the key a client sends, and the `<name> <sha256> <scopes>` line that configures it."""
    return generate(name, tuple(scopes.split(",")))


def ring(*entries: str) -> KeyRing:
    """A KeyRing holding exactly these entries (no file, no environment)."""
    return KeyRing(entries=parse_keys(list(entries), "test"))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def keyed(scopes: str = "events:write") -> tuple[KeyRing, dict[str, str]]:
    """A KeyRing with one fresh key of `scopes`, and the headers that send that key."""
    key, entry = new_key("tests", scopes)
    return ring(entry), bearer(key)
