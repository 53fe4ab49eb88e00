"""Contracts of the search: proof states, tactic results, environments, generators.

`search` is a leaf package: it declares here the protocols it needs and the other packages
implement them (`prover` provides Lean, LeanDojo and replay environments and the tactic
generators). Nothing in this module imports from another package of the project.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable


@dataclass(frozen=True)
class Theorem:
    """A theorem to prove.

    `id` names it uniquely within a benchmark (a LeanDojo `full_name`, a miniF2F `name`).
    `statement` is the Lean declaration without its proof (`theorem X ... :=` may be empty for
    replay-only theorems); `header` holds the imports/opens it needs. `metadata` carries
    backend-specific coordinates (LeanDojo `url`, `commit`, `file_path`, ...).
    """

    id: str
    statement: str = ""
    header: str = ""
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class ProofState:
    """A node of the search: the pretty-printed goals and an opaque backend handle.

    Invariant: two states with equal `pp` are the same search node (transposition table);
    `handle` is ignored by equality and hashing.
    """

    pp: str
    handle: Any = field(default=None, compare=False, hash=False)


class FailureKind(str, enum.Enum):
    """Why a tactic did not make progress."""

    LEAN_ERROR = "lean_error"  # Lean rejected the tactic (or the backend reported an error)
    TIMEOUT = "timeout"  # the tactic ran past its wall-clock limit
    CRASH = "crash"  # the backend process died or answered garbage
    GIVEN_UP = "given_up"  # the proof contains sorry/admit


@dataclass(frozen=True)
class Progress:
    """The tactic succeeded and goals remain. `from_cache` marks a cache hit."""

    state: ProofState
    from_cache: bool = False


@dataclass(frozen=True)
class Proved:
    """The tactic closed every goal."""

    from_cache: bool = False


@dataclass(frozen=True)
class Failed:
    """The tactic failed; `message` is the backend's text (Lean's error, a timeout note)."""

    kind: FailureKind
    message: str
    from_cache: bool = False


TacticResult = Progress | Proved | Failed


@dataclass(frozen=True)
class Verification:
    """Outcome of re-checking a complete proof from scratch. `message` says why not."""

    ok: bool
    message: str = ""


class EnvironmentStartError(Exception):
    """The environment could not open a theorem (unknown theorem, Lean failed to start)."""


@runtime_checkable
class ProofEnvironment(Protocol):
    """A Lean-like backend. Implementations: REPL, LeanDojo, replay (in `prover`).

    Implementations restart their own backend after a timeout or crash, so a `Failed`
    result never leaves the environment unusable. They are context managers.
    """

    def start(self, theorem: Theorem) -> ProofState:
        """Root state of `theorem`. Raises `EnvironmentStartError` when it cannot."""
        ...

    def apply(self, state: ProofState, tactic: str, timeout_s: float | None = None) -> TacticResult:
        """Run `tactic` on `state`; `timeout_s` is a wall-clock limit in seconds."""
        ...

    def verify(self, theorem: Theorem, tactics: Sequence[str]) -> Verification:
        """Re-check the whole proof `tactics` of `theorem` from scratch."""
        ...

    def __enter__(self) -> "ProofEnvironment": ...

    def __exit__(self, *exc: object) -> None: ...


@dataclass(frozen=True)
class Candidate:
    """A proposed tactic and its score.

    `logprob` is the natural-log probability of the whole tactic under the generator
    (sum of its token log-probs), so it is <= 0; fixed lists use their own <= 0 scores.
    """

    tactic: str
    logprob: float


@runtime_checkable
class TacticGenerator(Protocol):
    """Proposes tactics for many states at once (batched: many searches feed one model)."""

    name: str

    def propose(self, states: Sequence[str], k: int, *, timeout_s: float | None = None) -> list[list[Candidate]]:
        """For each pretty-printed state, up to `k` candidates (any order, may repeat).

        `timeout_s`: seconds left in the search's wall-clock budget (None: no limit). The call
        returns or raises `GeneratorError` within it; an answer that arrives later is dropped.
        """
        ...


class GeneratorError(RuntimeError):
    """A generator could not answer: model endpoint down or stalled, connection reset, HTTP
    503, out of memory, a dead actor, after the generator's own retries within the budget.

    An infrastructure failure, not a search outcome: the search ends with status ERROR and
    this message as the cause, never FAILED. `transient` says whether a later retry of the
    same theorem may succeed (evaluation's `--resume` retries errors either way).
    """

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


class GeneratorTimeout(GeneratorError):
    """The generator gave no answer within the `timeout_s` it was given (a stalled or
    overloaded model). The search ends with status TIMEOUT and this message as the cause."""
