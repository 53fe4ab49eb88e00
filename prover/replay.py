"""The replay environment: LeanDojo `traced_tactics` as a state graph, for tests and CI.

Every traced tactic of a LeanDojo benchmark is an edge
`state_before --tactic--> state_after`; `state_after == "no goals"` closes the proof.
The graph is global: a transition recorded in one theorem applies to an equal state of
any other theorem (equal pretty-printed goals), which is what Lean would do.
Only recorded transitions apply; anything else fails with a Lean-style error, so a search
over this environment has real semantics without Lean.

Tactic texts match after `collapse_whitespace` (every whitespace run becomes one space).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from search.types import (
    EnvironmentStartError,
    Failed,
    FailureKind,
    ProofState,
    Progress,
    Proved,
    TacticResult,
    Theorem,
    Verification,
)

NO_GOALS = "no goals"
GIVE_UP_TACTICS = frozenset({"sorry", "admit"})


def collapse_whitespace(tactic: str) -> str:
    """The replay graph's matching key: whitespace runs (spaces, tabs, newlines) → one space, trimmed."""
    return " ".join(tactic.split())


@dataclass(frozen=True)
class RecordedProof:
    """How a theorem's traced tactics replay from its root.

    `connected` iff applying the traced tactics in order from the root reaches `no goals`;
    then `length` is the number of tactics applied until then (later traced tactics are
    nested ones, e.g. inside a term-mode `by`). Otherwise `reason` says where it broke.
    """

    theorem_id: str
    connected: bool
    length: int | None
    tactics: tuple[str, ...]
    reason: str = ""


class ReplayEnvironment:
    """A `ProofEnvironment` that applies recorded LeanDojo transitions only.

    Read-only after construction, hence safe to share between threads. `latency_s`
    (seconds) is slept on every `apply`, to stand in for Lean's cost in benchmarks and
    budget tests; when it exceeds the call's `timeout_s`, the call sleeps `timeout_s` and
    fails with `FailureKind.TIMEOUT`.

    Invariants: `_edges[(state_before, collapsed tactic)]` is the first recorded
    `state_after` (later conflicting records are counted in `conflicts`); `_roots[id]` is
    the `state_before` of the theorem's first traced tactic.
    """

    def __init__(self, theorems: Iterable[Any], *, latency_s: float = 0.0) -> None:
        if latency_s < 0:
            raise ValueError(f"latency_s must be >= 0 seconds, got {latency_s!r}")
        self.latency_s = float(latency_s)
        self._edges: dict[tuple[str, str], str] = {}
        self._outgoing: dict[str, list[str]] = {}  # state → recorded tactic texts (original spelling)
        self._roots: dict[str, str] = {}
        self._tactics: dict[str, tuple[str, ...]] = {}
        self.theorem_ids: list[str] = []  # every theorem read, in file order
        self.without_tactics: list[str] = []  # theorems with no traced tactics (cannot start)
        self.duplicate_ids: list[str] = []  # repeated full names (the first occurrence is kept)
        self.conflicts = 0  # recorded (state, tactic) pairs whose state_after disagreed with an earlier record
        self._lock = threading.Lock()
        self.apply_calls = 0
        for theorem in theorems:
            self._add(theorem)

    @classmethod
    def from_benchmark(cls, path: str | Path | None = None, *, latency_s: float = 0.0) -> "ReplayEnvironment":
        """Build from a LeanDojo benchmark JSON file (default: the bundled sample)."""
        from training.data import SAMPLE_PATH, read_benchmark

        return cls(read_benchmark(Path(path) if path is not None else SAMPLE_PATH), latency_s=latency_s)

    def _add(self, theorem: Any) -> None:
        name = theorem.full_name
        if name in self._tactics or name in self.without_tactics:
            self.duplicate_ids.append(name)
            return
        self.theorem_ids.append(name)
        traced = list(theorem.traced_tactics)
        if not traced:
            self.without_tactics.append(name)
            return
        self._roots[name] = traced[0].state_before
        self._tactics[name] = tuple(t.tactic for t in traced)
        for step in traced:
            key = (step.state_before, collapse_whitespace(step.tactic))
            recorded = self._edges.get(key)
            if recorded is None:
                self._edges[key] = step.state_after
                self._outgoing.setdefault(step.state_before, []).append(step.tactic)
            elif recorded != step.state_after:
                self.conflicts += 1

    # ----------------------------------------------------------------- queries

    def __contains__(self, theorem_id: str) -> bool:
        return theorem_id in self._roots

    @property
    def startable_ids(self) -> list[str]:
        """Theorems with traced tactics, in file order."""
        return [name for name in self.theorem_ids if name in self._roots]

    def recorded_tactics(self, state_pp: str) -> list[str]:
        """Tactic texts recorded from this state (any theorem), in first-seen order."""
        return list(self._outgoing.get(state_pp, ()))

    def all_tactics(self) -> list[str]:
        """Every distinct recorded tactic text (collapsed), in first-seen order."""
        seen: dict[str, None] = {}
        for _, tactic in self._edges:
            seen.setdefault(tactic, None)
        return list(seen)

    def traced_tactics_of(self, theorem_id: str) -> tuple[str, ...]:
        self._require(theorem_id)
        return self._tactics[theorem_id]

    def recorded_proof(self, theorem_id: str) -> RecordedProof:
        """Replay the theorem's traced tactics in order from its root (see `RecordedProof`)."""
        self._require(theorem_id)
        tactics = self._tactics[theorem_id]
        state = self._roots[theorem_id]
        for index, tactic in enumerate(tactics):
            after = self._edges.get((state, collapse_whitespace(tactic)))
            if after is None:
                return RecordedProof(
                    theorem_id, False, None, tactics,
                    f"traced tactic {index + 1} ({tactic!r}) is not recorded from the state reached by the previous ones",
                )
            if after == NO_GOALS:
                return RecordedProof(theorem_id, True, index + 1, tactics[: index + 1])
            state = after
        return RecordedProof(theorem_id, False, None, tactics, "the traced tactics end with goals left")

    def connected_proofs(self) -> list[RecordedProof]:
        """The recorded proofs that replay to `no goals`, in file order."""
        proofs = (self.recorded_proof(name) for name in self.startable_ids)
        return [proof for proof in proofs if proof.connected]

    def _require(self, theorem_id: str) -> None:
        if theorem_id in self._roots:
            return
        if theorem_id in self.without_tactics:
            raise EnvironmentStartError(f"theorem {theorem_id!r} has no traced tactics: the replay environment cannot open it")
        raise EnvironmentStartError(f"theorem {theorem_id!r} is not in the replay data ({len(self._roots)} theorems can be opened)")

    # ------------------------------------------------------------ environment

    def start(self, theorem: Theorem) -> ProofState:
        self._require(theorem.id)
        return ProofState(pp=self._roots[theorem.id], handle=theorem.id)

    def apply(self, state: ProofState, tactic: str, timeout_s: float | None = None) -> TacticResult:
        with self._lock:
            self.apply_calls += 1
        if self.latency_s > 0:
            if timeout_s is not None and self.latency_s > timeout_s:
                time.sleep(timeout_s)
                return Failed(FailureKind.TIMEOUT, f"tactic {tactic!r} timed out after {timeout_s:g} s")
            time.sleep(self.latency_s)
        return self._transition(state.pp, tactic)

    def _transition(self, state_pp: str, tactic: str) -> TacticResult:
        key = collapse_whitespace(tactic)
        if key in GIVE_UP_TACTICS:
            return Failed(FailureKind.GIVEN_UP, f"declaration uses '{key}'")
        if state_pp == NO_GOALS:
            return Failed(FailureKind.LEAN_ERROR, "<replay>:1:0: error: no goals to be proved")
        after = self._edges.get((state_pp, key))
        if after is None:
            if not key:
                return Failed(FailureKind.LEAN_ERROR, "<replay>:1:0: error: unknown tactic (empty tactic text)")
            return Failed(
                FailureKind.LEAN_ERROR,
                f"<replay>:1:0: error: unknown tactic or tactic failed: {key!r} "
                "(no recorded transition from this state; the replay environment applies traced tactics only)",
            )
        if after == NO_GOALS:
            return Proved()
        return Progress(ProofState(pp=after))

    def verify(self, theorem: Theorem, tactics: Sequence[str]) -> Verification:
        """Replay `tactics` from the root; ok iff every step applies and the last one closes the proof."""
        try:
            self._require(theorem.id)
        except EnvironmentStartError as err:
            return Verification(False, str(err))
        if not tactics:
            return Verification(False, "empty proof: unsolved goals")
        state = self._roots[theorem.id]
        for index, tactic in enumerate(tactics):
            result = self._transition(state, tactic)
            if isinstance(result, Failed):
                return Verification(False, f"step {index + 1} ({tactic!r}): {result.message}")
            if isinstance(result, Proved):
                if index + 1 < len(tactics):
                    return Verification(False, f"step {index + 2} ({tactics[index + 1]!r}): no goals to be proved")
                return Verification(True)
            state = result.state.pp
        return Verification(False, f"unsolved goals after {len(tactics)} tactics:\n{state}")

    def __enter__(self) -> "ReplayEnvironment":
        return self

    def __exit__(self, *exc: object) -> None:
        return None
