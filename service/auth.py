"""API keys (stored hashed), per-key token-bucket rate limits and scopes.

A key is `dco-<id>.<secret>`: `id` names the key (it is not secret), `secret` is 32 random
bytes (URL-safe base64). The key file stores, per id, a random salt and
`sha256(salt || secret)`; never the secret. A salted fast hash suffices because secrets
carry 256 bits of entropy (slow KDFs defend low-entropy passwords), and it keeps
authentication cheap enough for thousands of status requests per second.

Key file (JSON, written by `add_key`):
    {"version": 1, "keys": [{"id": "alice", "salt": hex, "sha256": hex, "created_at": unix_s,
      "scopes": ["prove", "check"], "disabled": false,
      "rate_per_s": null, "burst": null, "max_concurrent_jobs": null}]}
`null` limits take the server's defaults (`AuthConfig`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.config import AuthConfig
from service.errors import ApiError

KEY_PREFIX = "dco-"
KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SCOPES = ("prove", "check")
ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Principal:
    """The caller of a request, with its effective limits."""

    key_id: str
    scopes: frozenset[str]
    rate_per_s: float  # token refill, requests per second
    burst: int  # bucket size, requests
    max_concurrent_jobs: int


@dataclass(frozen=True)
class _KeyEntry:
    id: str
    salt: bytes
    digest: bytes
    scopes: frozenset[str]
    disabled: bool
    rate_per_s: float | None
    burst: int | None
    max_concurrent_jobs: int | None


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode("utf-8")).digest()


def _read_key_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"version": 1, "keys": []}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError(f"API key file {path} must be a JSON object with a 'keys' list")
    return data


def _parse_entries(path: Path, data: dict[str, Any]) -> dict[str, _KeyEntry]:
    entries: dict[str, _KeyEntry] = {}
    for index, raw in enumerate(data["keys"]):
        try:
            key_id = raw["id"]
            if not KEY_ID.match(key_id):
                raise ValueError(f"id {key_id!r} must match {KEY_ID.pattern}")
            if key_id in entries:
                raise ValueError(f"id {key_id!r} appears twice")
            scopes = frozenset(raw.get("scopes", SCOPES))
            unknown = scopes - set(SCOPES)
            if unknown:
                raise ValueError(f"unknown scopes {sorted(unknown)} (known: {list(SCOPES)})")
            entries[key_id] = _KeyEntry(
                id=key_id,
                salt=bytes.fromhex(raw["salt"]),
                digest=bytes.fromhex(raw["sha256"]),
                scopes=scopes,
                disabled=bool(raw.get("disabled", False)),
                rate_per_s=raw.get("rate_per_s"),
                burst=raw.get("burst"),
                max_concurrent_jobs=raw.get("max_concurrent_jobs"),
            )
        except (KeyError, ValueError, TypeError) as err:
            raise ValueError(f"API key file {path}: entry {index}: {err}") from err
    return entries


def add_key(
    path: str | Path,
    key_id: str,
    *,
    scopes: tuple[str, ...] = SCOPES,
    rate_per_s: float | None = None,
    burst: int | None = None,
    max_concurrent_jobs: int | None = None,
) -> str:
    """Create key `key_id` in the key file (created 0600 if absent) and return the secret key, shown once."""
    if not KEY_ID.match(key_id):
        raise ValueError(f"key id {key_id!r} must match {KEY_ID.pattern}")
    unknown = set(scopes) - set(SCOPES)
    if unknown:
        raise ValueError(f"unknown scopes {sorted(unknown)} (known: {list(SCOPES)})")
    path = Path(path)
    data = _read_key_file(path)
    if any(entry.get("id") == key_id for entry in data["keys"]):
        raise ValueError(f"key id {key_id!r} already exists in {path}")
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    data["keys"].append(
        {
            "id": key_id,
            "salt": salt.hex(),
            "sha256": _digest(salt, secret).hex(),
            "created_at": time.time(),
            "scopes": list(scopes),
            "disabled": False,
            "rate_per_s": rate_per_s,
            "burst": burst,
            "max_concurrent_jobs": max_concurrent_jobs,
        }
    )
    _parse_entries(path, data)  # refuse to write a file the server could not read
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return f"{KEY_PREFIX}{key_id}.{secret}"


class KeyRing:
    """The server's view of the key file; re-read when its modification time changes."""

    RELOAD_CHECK_S = 1.0  # seconds between modification-time checks

    def __init__(self, path: Path, config: AuthConfig) -> None:
        self.path = path
        self.config = config
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._checked = 0.0
        self._entries: dict[str, _KeyEntry] = {}
        self._reload(force=True)

    def _reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < self.RELOAD_CHECK_S:
            return
        self._checked = now
        mtime = self.path.stat().st_mtime if self.path.exists() else None
        if not force and mtime == self._mtime:
            return
        self._entries = _parse_entries(self.path, _read_key_file(self.path))
        self._mtime = mtime

    @property
    def key_count(self) -> int:
        return len(self._entries)

    def authenticate(self, token: str | None) -> Principal:
        """The principal of a bearer token; `ApiError` 401 (who are you?) or 403 (disabled)."""
        with self._lock:
            self._reload()
            entries = self._entries
        if token is None:
            if self.config.allow_anonymous:
                return self._principal(ANONYMOUS, None)
            hint = "" if entries else "; the server has no keys yet: create one with `dco-prover serve --add-key NAME`"
            raise ApiError(401, "missing_api_key", f"send an API key as 'Authorization: Bearer dco-<id>.<secret>'{hint}")
        if not token.startswith(KEY_PREFIX) or "." not in token:
            raise ApiError(401, "malformed_api_key", "API keys look like 'dco-<id>.<secret>'")
        key_id, _, secret = token[len(KEY_PREFIX):].partition(".")
        entry = entries.get(key_id)
        if entry is None or not hmac.compare_digest(entry.digest, _digest(entry.salt, secret)):
            raise ApiError(401, "invalid_api_key", "unknown API key or wrong secret")
        if entry.disabled:
            raise ApiError(403, "api_key_disabled", f"API key {key_id!r} is disabled")
        return self._principal(key_id, entry)

    def _principal(self, key_id: str, entry: _KeyEntry | None) -> Principal:
        c = self.config

        def pick(value, default):
            return default if value is None else value

        return Principal(
            key_id=key_id,
            scopes=entry.scopes if entry is not None else frozenset(SCOPES),
            rate_per_s=float(pick(entry and entry.rate_per_s, c.rate_per_s)),
            burst=int(pick(entry and entry.burst, c.burst)),
            max_concurrent_jobs=int(pick(entry and entry.max_concurrent_jobs, c.max_concurrent_jobs)),
        )


def require_scope(principal: Principal, scope: str) -> None:
    if scope not in principal.scopes:
        raise ApiError(403, "scope_denied", f"API key {principal.key_id!r} may not {scope} (its scopes: {sorted(principal.scopes)})")


class RateLimiter:
    """Per-key token buckets: `burst` tokens, refilled at `rate_per_s`; one token per request."""

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key id → (tokens, last refill time)

    def acquire(self, principal: Principal) -> float | None:
        """Take a token; None when granted, else the seconds until one is available."""
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(principal.key_id, (float(principal.burst), now))
            tokens = min(float(principal.burst), tokens + (now - last) * principal.rate_per_s)
            if tokens >= 1.0:
                self._buckets[principal.key_id] = (tokens - 1.0, now)
                return None
            self._buckets[principal.key_id] = (tokens, now)
            return (1.0 - tokens) / principal.rate_per_s
