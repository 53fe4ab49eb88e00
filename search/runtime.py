"""The runtime of one search: budget checks, environment calls, counters and the error log.

Every environment call and every generator call of a search goes through one
`SearchContext`, which

- checks the cancel event and the wall-clock deadline *before* the call and raises
  `StopSearch` when either fired (so a search overshoots its time limit by at most one
  tactic timeout: a Lean call gets `min(tactic_timeout_s, remaining)`, and a generator
  call gets the remaining time as its `timeout_s`, its late answers dropped — see
  `search.proposer`);
- passes `min(tactic_timeout_s, remaining)` to `env.apply` as its timeout;
- turns exceptions and malformed answers of the environment into `Failed(CRASH)` results
  recorded in the error log, so they never crash a search;
- counts Lean calls, cache hits/misses (the `from_cache` flag of each result), and the
  time spent in Lean.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Sequence

from search.budget import Budget, Deadline
from search.result import SearchResult, Status
from search.tactic_filter import TacticFilter
from search.types import (
    EnvironmentStartError,
    Failed,
    FailureKind,
    ProofEnvironment,
    ProofState,
    Progress,
    Proved,
    TacticResult,
    Theorem,
    Verification,
)

_perf_counter = time.perf_counter

MAX_ERROR_MESSAGES = 32  # the error log keeps this many messages; every error is counted

ProgressCallback = Callable[[dict], None]

_FAILURE_ERROR_KINDS = {
    FailureKind.TIMEOUT: "env_timeout",
    FailureKind.CRASH: "env_crash",
    FailureKind.GIVEN_UP: "env_given_up",
}


class StopSearch(Exception):
    """Raised inside a search when the deadline passed or the cancel event fired."""

    def __init__(self, status: Status) -> None:
        super().__init__(status.value)
        self.status = status


class ErrorLog:
    """Counts every error by kind and keeps the first `MAX_ERROR_MESSAGES` messages."""

    __slots__ = ("messages", "counts")

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.counts: dict[str, int] = {}

    def record(self, kind: str, message: str, *, keep: bool = False) -> None:
        """Count `kind`; keep `message` while there is room, or always with `keep` (the
        cause that ended a search must reach the record even after many other errors)."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if keep or len(self.messages) < MAX_ERROR_MESSAGES:
            self.messages.append(f"{kind}: {message}")


class SearchContext:
    """Budget checks, environment access and counters of one search (one ensemble member).

    Not thread-safe: one search runs on one thread. `deadline` may run on a clock that
    only advances while this search is active (union ensembles interleave members).
    """

    def __init__(
        self,
        env: ProofEnvironment,
        theorem: Theorem,
        budget: Budget,
        *,
        tactic_filter: TacticFilter,
        deadline: Deadline | None = None,
        cancel: threading.Event | None = None,
        progress: ProgressCallback | None = None,
    ) -> None:
        self.env = env
        self.theorem = theorem
        self.budget = budget
        self.tactic_filter = tactic_filter
        self.deadline = deadline if deadline is not None else Deadline(budget.time_limit_s)
        self.cancel = cancel
        self.progress = progress
        self.errors = ErrorLog()
        self.dropped: dict[str, int] = {}
        self.lean_calls = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self.generator_calls = 0
        self.generator_time_s = 0.0
        self.lean_time_s = 0.0
        self.max_depth_reached = 0
        # Bound methods cached for the hot path.
        self._remaining = self.deadline.remaining
        self._is_cancelled = cancel.is_set if cancel is not None else None
        self._env_apply = env.apply
        self._tactic_timeout_s = float(budget.tactic_timeout_s)

    # -- budget -----------------------------------------------------------------------

    def check(self) -> float:
        """Seconds left; raises `StopSearch` if cancelled or past the deadline."""
        if self._is_cancelled is not None and self._is_cancelled():
            raise StopSearch(Status.CANCELLED)
        remaining = self._remaining()
        if remaining <= 0.0:
            raise StopSearch(Status.TIMEOUT)
        return remaining

    # -- environment ------------------------------------------------------------------

    def apply(self, state: ProofState, tactic: str) -> TacticResult:
        """`env.apply` under the budget; never raises except `StopSearch`.

        Invariant: `cache_hits + cache_misses == lean_calls` (exceptions and malformed
        answers count as misses).
        """
        # The hot path: `check()` inlined.
        if self._is_cancelled is not None and self._is_cancelled():
            raise StopSearch(Status.CANCELLED)
        remaining = self._remaining()
        if remaining <= 0.0:
            raise StopSearch(Status.TIMEOUT)
        timeout = self._tactic_timeout_s if self._tactic_timeout_s < remaining else remaining
        self.lean_calls += 1
        start = _perf_counter()
        try:
            result = self._env_apply(state, tactic, timeout)
        except Exception as exc:  # an environment bug or a dead backend: recorded, not fatal
            self.lean_time_s += _perf_counter() - start
            message = f"{type(exc).__name__}: {exc} (tactic {tactic!r})"
            self.errors.record("env_exception", message)
            self.cache_misses += 1
            return Failed(FailureKind.CRASH, message)
        self.lean_time_s += _perf_counter() - start
        kind = type(result)
        if kind is not Progress and kind is not Failed and kind is not Proved:
            if not isinstance(result, (Progress, Proved, Failed)):
                message = f"env.apply returned {kind.__name__}, not a TacticResult (tactic {tactic!r})"
                self.errors.record("env_invalid_result", message)
                self.cache_misses += 1
                return Failed(FailureKind.CRASH, message)
        if result.from_cache:
            self.cache_hits += 1
        else:
            self.cache_misses += 1
        if kind is Progress and type(result.state) is ProofState and type(result.state.pp) is str:
            return result
        if isinstance(result, Failed) and result.kind is not FailureKind.LEAN_ERROR:
            self.errors.record(_FAILURE_ERROR_KINDS.get(result.kind, "env_failure"), f"{result.message} (tactic {tactic!r})")
            if result.kind is FailureKind.TIMEOUT and timeout < self._tactic_timeout_s:
                # Cut short by the search's deadline, not a slow tactic: the search is out of time.
                raise StopSearch(Status.TIMEOUT)
        elif isinstance(result, Progress) and not (
            isinstance(result.state, ProofState) and isinstance(result.state.pp, str)
        ):
            message = f"env.apply returned a Progress without a ProofState with a str pp (tactic {tactic!r})"
            self.errors.record("env_invalid_result", message)
            return Failed(FailureKind.CRASH, message)
        return result

    def verify(self, tactics: Sequence[str]) -> Verification:
        """`env.verify` of a complete proof. Runs even past the deadline: a proof found within
        the budget is always checked and reported. Exceptions count as a rejection."""
        start = time.perf_counter()
        try:
            verification = self.env.verify(self.theorem, list(tactics))
        except Exception as exc:
            verification = Verification(False, f"verification raised {type(exc).__name__}: {exc}")
        self.lean_time_s += time.perf_counter() - start
        if not isinstance(verification, Verification):
            verification = Verification(False, f"env.verify returned {type(verification).__name__}, not a Verification")
        if not verification.ok:
            self.errors.record("verification_rejected", f"{verification.message} (proof {list(tactics)!r})")
        return verification

    # -- bookkeeping ------------------------------------------------------------------

    def add_dropped(self, dropped: dict[str, int]) -> None:
        for reason, count in dropped.items():
            self.dropped[reason] = self.dropped.get(reason, 0) + count

    def report(self, payload: dict) -> None:
        """Call the progress callback; its exceptions are recorded, never propagated."""
        if self.progress is None:
            return
        try:
            self.progress(payload)
        except Exception as exc:
            self.errors.record("progress_callback", f"{type(exc).__name__}: {exc}")

    def fill(self, result: SearchResult) -> SearchResult:
        """Copy the counters and the error log into `result`."""
        result.lean_calls = self.lean_calls
        result.cache_hits = self.cache_hits
        result.cache_misses = self.cache_misses
        result.generator_calls = self.generator_calls
        result.generator_time_s = self.generator_time_s
        result.lean_time_s = self.lean_time_s
        result.wall_time_s = self.deadline.elapsed()
        result.max_depth_reached = self.max_depth_reached
        result.errors = list(self.errors.messages)
        result.error_counts = dict(self.errors.counts)
        result.dropped_candidates = dict(self.dropped)
        return result


def start_root(env: ProofEnvironment, theorem: Theorem) -> ProofState | str:
    """The root state of `theorem`, or the error message when the environment cannot open it
    (`EnvironmentStartError`, any other exception, or a malformed answer)."""
    try:
        root = env.start(theorem)
    except EnvironmentStartError as exc:
        return f"environment could not start {theorem.id!r}: {exc}"
    except Exception as exc:
        return f"environment start raised {type(exc).__name__} for {theorem.id!r}: {exc}"
    if not isinstance(root, ProofState):
        return f"env.start returned {type(root).__name__}, not a ProofState, for {theorem.id!r}"
    return root


def error_result(theorem: Theorem, strategy: str, message: str, wall_time_s: float, member: str | None = None) -> SearchResult:
    """The record of a search that could not start."""
    return SearchResult(
        theorem_id=theorem.id,
        status=Status.ERROR,
        strategy=strategy,
        member=member,
        wall_time_s=wall_time_s,
        errors=[f"env_start: {message}"],
        error_counts={"env_start": 1},
    )
