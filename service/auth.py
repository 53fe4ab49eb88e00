"""API keys (stored hashed), per-key limits and scopes; the key file's one owner.

A key is `dco-<id>.<secret>`: `id` names the key (it is not secret), `secret` is 32 random
bytes (URL-safe base64). The key file stores, per id, a random salt and
`sha256(salt || secret)`; never the secret. A salted fast hash suffices because secrets
carry 256 bits of entropy (slow KDFs defend low-entropy passwords), and it keeps
authentication cheap enough for thousands of status requests per second.

Key file (JSON, 0600, written atomically by `add_key` / `revoke_key` / `rotate_key`):
    {"version": 1, "keys": [{"id": "alice", "salt": hex, "sha256": hex, "created_at": unix_s,
      "scopes": ["prove", "check"], "disabled": false, "revoked_at": null,
      "rate_per_s": null, "burst": null, "max_concurrent_jobs": null,
      "max_open_streams": null, "max_concurrent_checks": null}]}
`null` limits take the server's defaults (`AuthConfig`).

Revocation list (`<key file>.revoked`, 0600, append-only): one revoked credential digest
(`sha256` hex) per line, written by `revoke_key` and `rotate_key` before the key file. The
server honours it always, so a revoked credential stays refused even if the key file is
later damaged.

Failing closed: when the key file cannot be read or parsed, the server keeps the last good
version and accepts only credentials valid in it, not in the revocation list, and (when the
damaged file's text can be read) whose digest the damaged text still holds: a key removed,
rotated or cut off by the bad write is refused. Every other credential gets 503
`key_file_unreadable` (the server cannot judge it). The error is logged once per change
of the file and shown by /readyz. A missing key file means no keys.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from service.config import AuthConfig
from service.errors import ApiError

log = logging.getLogger("service.auth")

KEY_PREFIX = "dco-"
KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SCOPES = ("prove", "check")
ANONYMOUS = "anonymous"
LIMIT_FIELDS = ("rate_per_s", "burst", "max_concurrent_jobs", "max_open_streams", "max_concurrent_checks")
KEY_FILE_RETRY_S = 30.0  # Retry-After (seconds) while the key file cannot be read


@dataclass(frozen=True)
class Principal:
    """The caller of a request, with its effective limits."""

    key_id: str
    scopes: frozenset[str]
    rate_per_s: float  # token refill, requests per second
    burst: int  # bucket size, requests
    max_concurrent_jobs: int
    max_open_streams: int = 8  # concurrent event streams
    max_concurrent_checks: int = 2  # /v1/check requests in flight


@dataclass(frozen=True)
class _KeyEntry:
    id: str
    salt: bytes
    digest: bytes
    scopes: frozenset[str]
    disabled: bool
    limits: dict[str, float | int | None]


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode("utf-8")).digest()


def revocations_path(path: Path) -> Path:
    return path.with_name(path.name + ".revoked")


def _read_key_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"version": 1, "keys": []}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"API key file {path.name} is not valid JSON ({err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError(f"API key file {path.name} must be a JSON object with a 'keys' list")
    return data


def _read_revocations(path: Path) -> frozenset[bytes]:
    file = revocations_path(path)
    if not file.exists():
        return frozenset()
    out = set()
    for number, line in enumerate(file.read_text(encoding="ascii").splitlines(), 1):
        line = line.strip()
        if line:
            try:
                out.add(bytes.fromhex(line))
            except ValueError as err:
                raise ValueError(f"revocation list {file.name} line {number} is not a hex digest") from err
    return frozenset(out)


def _parse_entries(path: Path, data: dict[str, Any]) -> dict[str, _KeyEntry]:
    entries: dict[str, _KeyEntry] = {}
    for index, raw in enumerate(data["keys"]):
        try:
            key_id = raw["id"]
            if not isinstance(key_id, str) or not KEY_ID.match(key_id):
                raise ValueError(f"id {key_id!r} must match {KEY_ID.pattern}")
            if key_id in entries:
                raise ValueError(f"id {key_id!r} appears twice")
            scopes = frozenset(raw.get("scopes", SCOPES))
            unknown = scopes - set(SCOPES)
            if unknown:
                raise ValueError(f"unknown scopes {sorted(unknown)} (known: {list(SCOPES)})")
            limits = {name: raw.get(name) for name in LIMIT_FIELDS}
            for name, value in limits.items():
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                    raise ValueError(f"{name} must be a positive number or null, got {value!r}")
            entries[key_id] = _KeyEntry(
                id=key_id,
                salt=bytes.fromhex(raw["salt"]),
                digest=bytes.fromhex(raw["sha256"]),
                scopes=scopes,
                disabled=bool(raw.get("disabled", False)) or raw.get("revoked_at") is not None,
                limits=limits,
            )
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            raise ValueError(f"API key file {path.name}: entry {index}: {err}") from err
    return entries


# ------------------------------------------------------------ writing the file


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise read-modify-write cycles of the key file between processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_atomically(path: Path, data: dict[str, Any]) -> None:
    """Replace `path` with `data` (0600): a reader sees the old file or the new one, never a part."""
    _parse_entries(path, data)  # refuse to write a file the server could not read
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def _append_revocation(path: Path, digest_hex: str) -> None:
    fd = os.open(revocations_path(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (digest_hex + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_limits(limits: dict[str, Any]) -> None:
    for name, value in limits.items():
        if name not in LIMIT_FIELDS:
            raise ValueError(f"unknown limit {name!r} (known: {list(LIMIT_FIELDS)})")
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")


def add_key(
    path: str | Path,
    key_id: str,
    *,
    scopes: tuple[str, ...] = SCOPES,
    rate_per_s: float | None = None,
    burst: int | None = None,
    max_concurrent_jobs: int | None = None,
    max_open_streams: int | None = None,
    max_concurrent_checks: int | None = None,
) -> str:
    """Create key `key_id` in the key file (created 0600 if absent) and return the secret key, shown once."""
    if not KEY_ID.match(key_id):
        raise ValueError(f"key id {key_id!r} must match {KEY_ID.pattern}")
    unknown = set(scopes) - set(SCOPES)
    if unknown:
        raise ValueError(f"unknown scopes {sorted(unknown)} (known: {list(SCOPES)})")
    limits = {"rate_per_s": rate_per_s, "burst": burst, "max_concurrent_jobs": max_concurrent_jobs,
              "max_open_streams": max_open_streams, "max_concurrent_checks": max_concurrent_checks}
    _check_limits(limits)
    path = Path(path)
    with _locked(path):
        data = _read_key_file(path)
        if any(entry.get("id") == key_id for entry in data["keys"]):
            raise ValueError(f"key id {key_id!r} already exists in {path.name}")
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        data["keys"].append(
            {"id": key_id, "salt": salt.hex(), "sha256": _digest(salt, secret).hex(), "created_at": time.time(),
             "scopes": list(scopes), "disabled": False, "revoked_at": None, **limits}
        )
        _write_atomically(path, data)
    return f"{KEY_PREFIX}{key_id}.{secret}"


def _entry_index(data: dict[str, Any], key_id: str, path: Path) -> int:
    for index, entry in enumerate(data["keys"]):
        if entry.get("id") == key_id:
            return index
    raise ValueError(f"no key {key_id!r} in {path.name}")


def revoke_key(path: str | Path, key_id: str) -> None:
    """Revoke `key_id` for good: its digest joins the revocation list, then the entry is marked revoked."""
    path = Path(path)
    with _locked(path):
        data = _read_key_file(path)
        entry = data["keys"][_entry_index(data, key_id, path)]
        _append_revocation(path, entry["sha256"])
        entry["revoked_at"] = time.time()
        entry["disabled"] = True
        _write_atomically(path, data)


def rotate_key(path: str | Path, key_id: str) -> str:
    """Give `key_id` a new secret (same id, scopes and limits); the old secret is revoked. Returns the new key."""
    path = Path(path)
    with _locked(path):
        data = _read_key_file(path)
        entry = data["keys"][_entry_index(data, key_id, path)]
        if entry.get("revoked_at") is not None:
            raise ValueError(f"key {key_id!r} is revoked; add a new key instead")
        _append_revocation(path, entry["sha256"])
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        entry.update(salt=salt.hex(), sha256=_digest(salt, secret).hex(), rotated_at=time.time())
        _write_atomically(path, data)
    return f"{KEY_PREFIX}{key_id}.{secret}"


def list_keys(path: str | Path) -> list[dict[str, Any]]:
    """The key file's entries without salts or digests."""
    path = Path(path)
    data = _read_key_file(path)
    _parse_entries(path, data)
    hidden = {"salt", "sha256"}
    return [{k: v for k, v in entry.items() if k not in hidden} for entry in data["keys"]]


# ------------------------------------------------------------- the server side


class KeyRing:
    """The server's view of the key file; re-read when the file changes (checked once per second)."""

    RELOAD_CHECK_S = 1.0  # seconds between file checks

    def __init__(self, path: Path, config: AuthConfig) -> None:
        self.path = path
        self.config = config
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._checked = 0.0
        self._entries: dict[str, _KeyEntry] = {}  # the last good file's
        self._revoked: frozenset[bytes] = frozenset()
        self._revoked_ok = True
        self.error: str | None = None  # why the current file cannot be used (None: it is the good one)
        self._broken_text: str | None = None  # the unparseable file's text (None: unreadable, or no error)
        self._reload(force=True)

    @staticmethod
    def _file_stamp(path: Path) -> tuple | None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < self.RELOAD_CHECK_S:
            return
        self._checked = now
        try:
            self._revoked = _read_revocations(self.path)
            if not self._revoked_ok:  # readable again (e.g. permissions fixed, same stamp): re-check everything
                force = True
            self._revoked_ok = True
        except (OSError, ValueError) as err:
            if self._revoked_ok:
                log.error("cannot read the API key revocation list: %s; refusing every key until it is fixed", err)
            self._revoked_ok = False
            self.error = f"the API key revocation list cannot be read: {err}"
        stamp = (self._file_stamp(self.path), self._file_stamp(revocations_path(self.path)))
        if not force and stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            with contextlib.suppress(FileNotFoundError):
                if self.path.stat().st_mode & 0o077:
                    os.chmod(self.path, 0o600)  # readable by the service user only
            entries = _parse_entries(self.path, _read_key_file(self.path))
        except (OSError, ValueError, UnicodeDecodeError) as err:
            try:
                self._broken_text = self.path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                self._broken_text = None
            message = str(err) if isinstance(err, ValueError) else f"API key file {self.path.name} cannot be read ({type(err).__name__}: {getattr(err, 'strerror', None) or err})"
            log.error("%s; until it is fixed only keys valid in its last good version are accepted (%d keys), "
                      "every other key gets 503", message, len(self._entries))
            self.error = message
            return
        if self._revoked_ok:
            if self.error is not None:
                log.warning("API key file %s is readable again (%d keys)", self.path.name, len(entries))
            self.error = None
        self._entries = entries
        self._broken_text = None

    @property
    def key_count(self) -> int:
        return len(self._entries)

    def status(self) -> tuple[bool, str]:
        """`(ok, detail)` for /readyz."""
        with self._lock:
            self._reload()
            if self.error is None:
                return True, f"{len(self._entries)} API keys"
            return False, f"{self.error}; only keys valid in its last good version ({len(self._entries)}) are accepted"

    def authenticate(self, token: str | None) -> Principal:
        """The principal of a bearer token; `ApiError` 401 (who are you?), 403 (disabled or
        revoked) or 503 (the key file cannot be read and this credential is not known good)."""
        with self._lock:
            self._reload()
            entries, revoked, error, revoked_ok = self._entries, self._revoked, self.error, self._revoked_ok
            broken_text = self._broken_text
        if token is None:
            if self.config.allow_anonymous:
                return self._principal(ANONYMOUS, None)
            hint = "" if entries else "; the server has no keys yet: create one with `dco-prover keys add NAME`"
            raise ApiError(401, "missing_api_key", f"send an API key as 'Authorization: Bearer dco-<id>.<secret>'{hint}")
        if not token.startswith(KEY_PREFIX) or "." not in token:
            raise ApiError(401, "malformed_api_key", "API keys look like 'dco-<id>.<secret>'")
        if not revoked_ok:
            raise ApiError(503, "key_file_unreadable", "the server cannot read its API key revocation list; try again later",
                           retry_after_s=KEY_FILE_RETRY_S)
        key_id, _, secret = token[len(KEY_PREFIX):].partition(".")
        entry = entries.get(key_id)
        good = entry is not None and hmac.compare_digest(entry.digest, _digest(entry.salt, secret))
        if good and entry is not None and error is not None and broken_text is not None and entry.digest.hex() not in broken_text:
            good = False  # the damaged file no longer holds this credential (removed, rotated or cut off)
        if not good or entry is None:
            if error is not None:  # maybe a key added in the file the server cannot read: cannot judge
                raise ApiError(503, "key_file_unreadable", "the server cannot read its API key file and this key is not in its "
                               "last good version; try again later", retry_after_s=KEY_FILE_RETRY_S)
            raise ApiError(401, "invalid_api_key", "unknown API key or wrong secret")
        if entry.digest in revoked:
            raise ApiError(403, "api_key_revoked", f"API key {key_id!r} has been revoked")
        if entry.disabled:
            raise ApiError(403, "api_key_disabled", f"API key {key_id!r} is disabled")
        return self._principal(key_id, entry)

    def _principal(self, key_id: str, entry: _KeyEntry | None) -> Principal:
        c = self.config
        limits = entry.limits if entry is not None else {}

        def pick(name: str, default):
            value = limits.get(name)
            return default if value is None else value

        return Principal(
            key_id=key_id,
            scopes=entry.scopes if entry is not None else frozenset(SCOPES),
            rate_per_s=float(pick("rate_per_s", c.rate_per_s)),
            burst=int(pick("burst", c.burst)),
            max_concurrent_jobs=int(pick("max_concurrent_jobs", c.max_concurrent_jobs)),
            max_open_streams=int(pick("max_open_streams", c.max_open_streams)),
            max_concurrent_checks=int(pick("max_concurrent_checks", c.max_concurrent_checks)),
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


class ConcurrencyLimiter:
    """Per-key counters of held resources (open event streams, checks in flight)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}

    def try_acquire(self, key_id: str, limit: int) -> bool:
        with self._lock:
            held = self._held.get(key_id, 0)
            if held >= limit:
                return False
            self._held[key_id] = held + 1
            return True

    def release(self, key_id: str) -> None:
        with self._lock:
            held = self._held.get(key_id, 0) - 1
            if held > 0:
                self._held[key_id] = held
            else:
                self._held.pop(key_id, None)

    def held(self, key_id: str) -> int:
        with self._lock:
            return self._held.get(key_id, 0)
