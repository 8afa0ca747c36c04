"""`recserve keys create`: make an API key, print it once, and append its sha256 digest to the keys file.

The service only ever holds digests (settings.AuthSettings), so a leaked keys file or environment grants nothing;
the key is shown once, here, and never written anywhere. Rotation: create a second key, move the clients to it,
then delete the old key's line (the service re-reads the file when it changes).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from pathlib import Path

from models.errors import ConfigError
from settings import KEY_NAME, SCOPES, parse_keys

KEY_BYTES = 32  # 256 random bits: token_urlsafe writes them as 43 characters


def key_line(name: str, key: str, scopes: tuple[str, ...]) -> str:
    """The entry that configures `key`: `<name> <sha256 hex> <scope>[,<scope>]` (no newline)."""
    return f"{name} {hashlib.sha256(key.encode()).hexdigest()} {','.join(scopes)}"


def generate(name: str, scopes: tuple[str, ...]) -> tuple[str, str]:
    """A new random key and its entry. Raises ConfigError for a bad name or scope."""
    if not re.match(KEY_NAME, name):
        raise ConfigError(f"--name {name!r} must match {KEY_NAME}: e.g. ci-events or ops-2026-11")
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise ConfigError(f"--scope {','.join(scopes)!r}: give one or more of {', '.join(SCOPES)}, comma-separated")
    key = secrets.token_urlsafe(KEY_BYTES)
    return key, key_line(name, key, tuple(dict.fromkeys(scopes)))


def create(name: str, scopes: tuple[str, ...], path: Path) -> str:
    """Append a new key's entry to `path` (created, with its folder, readable by its owner only) and return the
    key. Raises ConfigError when the file already holds `name` or a malformed line (fix it first: the service
    would refuse the whole file)."""
    try:
        existing = parse_keys(path.read_text().splitlines(), str(path)) if path.exists() else ()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the keys file ({exc}): fix its permissions or pass --file") from None
    if any(k.name == name for k in existing):
        raise ConfigError(
            f"{path} already has a key named {name!r}: pick another name (to rotate, create the new key, move the "
            "clients to it, then delete the old key's line)"
        )
    key, line = generate(name, scopes)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as out:
        if path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            out.write("\n")
        out.write(line + "\n")
    return key
