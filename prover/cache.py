"""A memoising wrapper around a proof environment, shared by ensemble members and passes.

`(state.pp, canonical tactic) → result`: Lean is deterministic on equal goals, so a
second application of the same tactic to an equal state costs nothing. Transient
failures (timeouts, crashes) are never cached: the next try may succeed.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Sequence

from search.types import (
    Failed,
    FailureKind,
    ProofEnvironment,
    ProofState,
    TacticResult,
    Theorem,
    Verification,
)

TRANSIENT_FAILURES = frozenset({FailureKind.TIMEOUT, FailureKind.CRASH})


def canonical_tactic(tactic: str) -> str:
    """The cache's tactic key: trimmed, trailing spaces of each line and blank lines removed.

    Layout-preserving on purpose: indentation and line breaks can change a Lean tactic's
    meaning, so they stay part of the key (unlike the replay graph's looser matching).
    """
    lines = (line.rstrip() for line in tactic.strip().splitlines())
    return "\n".join(line for line in lines if line)


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    entries: int
    evictions: int
    transient_not_cached: int


class CachingEnvironment:
    """Wraps a `ProofEnvironment`; thread-safe bounded LRU of tactic results.

    Hits are returned with `from_cache=True`; misses call the wrapped environment (outside
    the lock, so concurrent searches do not serialise on Lean). Two concurrent misses on
    one key both reach the environment and both count as misses.
    `start`, `verify` and the context manager delegate to the wrapped environment;
    verification is never cached.

    Cached `Progress` states keep the handle the backend returned the first time; backends
    whose handles can expire (a restarted REPL) must resolve stale handles themselves.
    """

    def __init__(self, env: ProofEnvironment, *, max_entries: int = 200_000) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be a positive integer, got {max_entries!r}")
        self.env = env
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], TacticResult] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.transient_not_cached = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self.hits, self.misses, len(self._entries), self.evictions, self.transient_not_cached)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def start(self, theorem: Theorem) -> ProofState:
        return self.env.start(theorem)

    def apply(self, state: ProofState, tactic: str, timeout_s: float | None = None) -> TacticResult:
        key = (state.pp, canonical_tactic(tactic))
        with self._lock:
            cached = self._entries.get(key)
            if cached is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return replace(cached, from_cache=True)
            self.misses += 1
        result = self.env.apply(state, tactic, timeout_s)
        if isinstance(result, Failed) and result.kind in TRANSIENT_FAILURES:
            with self._lock:
                self.transient_not_cached += 1
            return result
        with self._lock:
            self._entries[key] = replace(result, from_cache=False)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
                self.evictions += 1
        return result

    def verify(self, theorem: Theorem, tactics: Sequence[str]) -> Verification:
        return self.env.verify(theorem, tactics)

    def __enter__(self) -> "CachingEnvironment":
        self.env.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.env.__exit__(*exc)
