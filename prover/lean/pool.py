"""A pool of REPL processes keyed by the header's import set (the Kimina Lean Server design).

Invariants:
- The key of a header is the sorted set of its imported modules, so `import A\\nimport B`
  and `import B\\nimport A` share processes; the non-import rest of a header (`open`,
  `set_option`) is elaborated per process on top of the imports (`ReplProcess.header_env`).
- A process is leased to one caller at a time. `lease(header)` reuses an idle process of
  the same key, else starts one while under `max_size`, else evicts (closes) the idle
  process used least recently, else waits up to the acquire limit and raises `PoolBusy`.
  `lease_slot(slot)` waits for one specific process (proof states live in one process).
- `close()` closes every process; processes are also killed at interpreter exit
  (`process.kill_all_processes`). No lease is handed out after `close()`.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from prover.lean.process import ReplConfig, ReplProcess
from prover.lean.untrusted import parse_header

__all__ = ["HeaderKey", "header_key", "PoolBusy", "PoolClosed", "SlotGone", "ReplPool", "Lease"]

HeaderKey = tuple[str, ...]


def header_key(header: str) -> HeaderKey:
    """The sorted, de-duplicated module names a header imports."""
    return tuple(sorted(set(parse_header(header).imports)))


class PoolBusy(Exception):
    """Every process is leased and none became free within the wait limit."""


class PoolClosed(Exception):
    """The pool was closed."""


class SlotGone(Exception):
    """The process a proof state lived in was evicted or the pool closed."""


@dataclass
class _Entry:
    slot: int
    key: HeaderKey
    process: ReplProcess
    busy: bool = True
    last_used: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Lease:
    """A leased process: `slot` identifies it within the pool for `lease_slot`."""

    slot: int
    key: HeaderKey
    process: ReplProcess


class ReplPool:
    """Thread-safe pool. `max_size` defaults to `cpu_count - 1` (at least 1)."""

    def __init__(
        self,
        config: ReplConfig | None = None,
        *,
        max_size: int | None = None,
        acquire_timeout_s: float = 60.0,
        process_factory: Callable[[ReplConfig, HeaderKey], ReplProcess] | None = None,
    ) -> None:
        self.config = config or ReplConfig()
        self.max_size = max_size if max_size is not None else max(1, (os.cpu_count() or 2) - 1)
        if self.max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {self.max_size}")
        self.acquire_timeout_s = acquire_timeout_s
        self._factory = process_factory or (lambda cfg, key: ReplProcess(cfg, key))
        self._entries: dict[int, _Entry] = {}
        self._cond = threading.Condition()
        self._slots = itertools.count(1)
        self._closed = False
        self.evictions = 0
        self.started = 0

    # --- leasing ---------------------------------------------------------------------------

    @contextmanager
    def lease(self, header: str, timeout_s: float | None = None) -> Iterator[Lease]:
        """A process for `header`'s imports; raises `PoolBusy` after waiting `timeout_s`."""
        key = header_key(header)
        entry, victim = self._acquire(key, self._deadline(timeout_s))
        if victim is not None:
            victim.process.close()
        try:
            yield Lease(entry.slot, entry.key, entry.process)
        finally:
            self._release(entry)

    @contextmanager
    def lease_slot(self, slot: int, timeout_s: float | None = None) -> Iterator[Lease]:
        """The process in `slot`; raises `SlotGone` if it no longer exists, `PoolBusy` on timeout."""
        deadline = self._deadline(timeout_s)
        with self._cond:
            while True:
                if self._closed:
                    raise SlotGone("the REPL pool was closed")
                entry = self._entries.get(slot)
                if entry is None:
                    raise SlotGone(f"REPL process {slot} was evicted or closed")
                if not entry.busy:
                    entry.busy = True
                    break
                self._wait(deadline, f"REPL process {slot} stayed busy")
        try:
            yield Lease(entry.slot, entry.key, entry.process)
        finally:
            self._release(entry)

    def _deadline(self, timeout_s: float | None) -> tuple[float, float]:
        budget = self.acquire_timeout_s if timeout_s is None else timeout_s
        return time.monotonic() + budget, budget

    def _wait(self, deadline: tuple[float, float], what: str) -> None:
        remaining = deadline[0] - time.monotonic()
        if remaining <= 0:
            busy = sum(e.busy for e in self._entries.values())
            raise PoolBusy(
                f"{what}: {busy} of at most {self.max_size} REPL processes are leased; "
                f"gave up after waiting {deadline[1]:.1f} s"
            )
        self._cond.wait(remaining)

    def _acquire(self, key: HeaderKey, deadline: tuple[float, float]) -> tuple[_Entry, _Entry | None]:
        with self._cond:
            while True:
                if self._closed:
                    raise PoolClosed("the REPL pool was closed")
                idle_same = [e for e in self._entries.values() if e.key == key and not e.busy]
                if idle_same:
                    entry = max(idle_same, key=lambda e: e.last_used)
                    entry.busy = True
                    return entry, None
                victim = None
                if len(self._entries) >= self.max_size:
                    idle = [e for e in self._entries.values() if not e.busy]
                    if not idle:
                        self._wait(deadline, f"no REPL process for imports {list(key) or '(none)'}")
                        continue
                    victim = min(idle, key=lambda e: e.last_used)
                    del self._entries[victim.slot]
                    self.evictions += 1
                entry = _Entry(next(self._slots), key, self._factory(self.config, key))
                self._entries[entry.slot] = entry
                self.started += 1
                return entry, victim

    def _release(self, entry: _Entry) -> None:
        with self._cond:
            entry.busy = False
            entry.last_used = time.monotonic()
            closed = self._closed or entry.slot not in self._entries
            self._cond.notify_all()
        if closed:
            entry.process.close()

    # --- inspection and shutdown -----------------------------------------------------------

    def slots(self) -> dict[int, HeaderKey]:
        with self._cond:
            return {s: e.key for s, e in self._entries.items()}

    def processes(self) -> list[ReplProcess]:
        with self._cond:
            return [e.process for e in self._entries.values()]

    def close(self) -> None:
        """Closes every idle process now; leased ones are closed when their lease ends."""
        with self._cond:
            self._closed = True
            idle = [e for e in self._entries.values() if not e.busy]
            self._entries.clear()
            self._cond.notify_all()
        for e in idle:
            e.process.close()

    def __enter__(self) -> "ReplPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
