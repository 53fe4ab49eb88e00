"""The replay environment: LeanDojo `traced_tactics` as a state graph, for tests and CI.

Every traced tactic of a LeanDojo benchmark is an edge
`state_before --tactic--> state_after`; `state_after == "no goals"` closes the proof.
The graph is global: a transition recorded in one theorem applies to an equal state of
any other theorem (equal pretty-printed goals), which is what Lean would do.
Only recorded transitions apply, under the goal-stack model of `prover.replayability`
(a transition recorded on a goal alone also applies, focused, to a goal list that starts
with that goal: the other goals are carried along); anything else fails with a
Lean-style error, so a search over this environment has real semantics without Lean.

Only *replayable* theorems can be opened: those whose traced tactics are a tactic proof
of the whole statement (`prover.replayability.analyse_theorem` states the rule and why it
cannot take a side goal for the theorem). Every other theorem of the data is refused by
`start` with `NotReplayableError` (`not replayable [category]: ...`), so it stays in
every denominator as an error with its reason and is never proved.

Tactic texts match after `collapse_whitespace` (every whitespace run becomes one space).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from prover.replayability import (
    NO_GOALS,
    Replayability,
    acts_on_main_goal_only,
    analyse_theorem,
    collapse_whitespace,
    count_reasons,
    excluded,
    has_metavariable,
    load_exclusions,
    split_goals,
    step,
)
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

__all__ = ["NO_GOALS", "GIVE_UP_TACTICS", "NotReplayableError", "RecordedProof", "ReplayEnvironment", "collapse_whitespace"]

GIVE_UP_TACTICS = frozenset({"sorry", "admit"})


class NotReplayableError(EnvironmentStartError):
    """The theorem is in the replay data but its traced tactics are not a tactic proof of
    its statement; the message is `not replayable [category]: detail`."""


@dataclass(frozen=True)
class RecordedProof:
    """A theorem's recorded proof, as the replay decides it.

    `connected` iff the theorem is replayable (see `prover.replayability`): then `tactics`
    is a proof of its statement's goal from its traced tactics (the shortest one under the
    goal-stack model; nested tactics, e.g. inside a `have ... := by`, are not steps) and
    `length == len(tactics)`. Otherwise `category` and `reason` say why not.
    """

    theorem_id: str
    connected: bool
    length: int | None
    tactics: tuple[str, ...]
    reason: str = ""
    category: str = ""

    @property
    def replayable(self) -> bool:
        return self.connected


class ReplayEnvironment:
    """A `ProofEnvironment` that applies recorded LeanDojo transitions only.

    Read-only after construction, hence safe to share between threads. `latency_s`
    (seconds) is slept on every `apply`, to stand in for Lean's cost in benchmarks and
    budget tests; when it exceeds the call's `timeout_s`, the call sleeps `timeout_s` and
    fails with `FailureKind.TIMEOUT`.

    Invariants: `_edges[(state_before, collapsed tactic)]` is the first recorded
    `state_after` (later conflicting records are counted in `conflicts`);
    `_verdicts[id]` is the replayability of every theorem read; `_roots[id]` exists iff
    the theorem is replayable and is its statement's goal.
    """

    def __init__(self, theorems: Iterable[Any], *, latency_s: float = 0.0, exclusions: Mapping[str, str] | None = None) -> None:
        """`exclusions`: full name → reason, theorems refused although the data-only rule
        accepts them (default: `prover/resources/replay_exclusions.json`)."""
        if latency_s < 0:
            raise ValueError(f"latency_s must be >= 0 seconds, got {latency_s!r}")
        self.latency_s = float(latency_s)
        self._exclusions = dict(load_exclusions() if exclusions is None else exclusions)
        self._edges: dict[tuple[str, str], str] = {}
        self._outgoing: dict[str, list[str]] = {}  # state → recorded tactic texts (original spelling)
        self._roots: dict[str, str] = {}
        self._tactics: dict[str, tuple[str, ...]] = {}
        self._verdicts: dict[str, Replayability] = {}
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
        if name in self._verdicts:
            self.duplicate_ids.append(name)
            return
        self.theorem_ids.append(name)
        traced = list(theorem.traced_tactics)
        start, end = getattr(theorem, "start", None), getattr(theorem, "end", None)
        verdict = analyse_theorem(name, traced, (tuple(start), tuple(end)) if start is not None and end is not None else None)
        if name in self._exclusions:
            verdict = excluded(name, self._exclusions[name], verdict)
        self._verdicts[name] = verdict
        if not traced:
            self.without_tactics.append(name)
            return
        self._tactics[name] = tuple(t.tactic for t in traced)
        if verdict.replayable:
            assert verdict.root is not None
            self._roots[name] = verdict.root
        for t in traced:
            key = (t.state_before, collapse_whitespace(t.tactic))
            recorded = self._edges.get(key)
            if recorded is None:
                self._edges[key] = t.state_after
                self._outgoing.setdefault(t.state_before, []).append(t.tactic)
            elif recorded != t.state_after:
                self.conflicts += 1

    # ----------------------------------------------------------------- queries

    def __contains__(self, theorem_id: str) -> bool:
        """Whether the theorem is in the replay data (replayable or not)."""
        return theorem_id in self._verdicts

    @property
    def startable_ids(self) -> list[str]:
        """The replayable theorems (those `start` opens), in file order."""
        return [name for name in self.theorem_ids if name in self._roots]

    @property
    def not_replayable(self) -> dict[str, Replayability]:
        """Every theorem of the data that `start` refuses, with its verdict, in file order."""
        return {name: self._verdicts[name] for name in self.theorem_ids if name not in self._roots}

    def replayability(self, theorem_id: str) -> Replayability:
        """The verdict on a theorem of the data (`KeyError` for an unknown one)."""
        return self._verdicts[theorem_id]

    def replayability_counts(self) -> dict[str, Any]:
        """`{"theorems", "replayable", "not_replayable", "reasons": {category: n}}` over the data."""
        return count_reasons(self._verdicts[name] for name in self.theorem_ids)

    def recorded_tactics(self, state_pp: str) -> list[str]:
        """Tactic texts that apply at this state (recorded from it, or recorded from its
        first goal alone and applicable focused), in first-seen order."""
        tactics = list(self._outgoing.get(state_pp, ()))
        goals = split_goals(state_pp)
        if goals and len(goals) > 1 and not any(has_metavariable(g) for g in goals):
            seen = {collapse_whitespace(t) for t in tactics}
            for tactic in self._outgoing.get(goals[0], ()):
                key = collapse_whitespace(tactic)
                if key not in seen and acts_on_main_goal_only(key):
                    seen.add(key)
                    tactics.append(tactic)
        return tactics

    def all_tactics(self) -> list[str]:
        """Every distinct recorded tactic text (collapsed), in first-seen order."""
        seen: dict[str, None] = {}
        for _, tactic in self._edges:
            seen.setdefault(tactic, None)
        return list(seen)

    def traced_tactics_of(self, theorem_id: str) -> tuple[str, ...]:
        if theorem_id not in self._verdicts:
            self._require(theorem_id)
        return self._tactics.get(theorem_id, ())

    def recorded_proof(self, theorem_id: str) -> RecordedProof:
        """The theorem's recorded proof, or why it has none (see `RecordedProof`)."""
        verdict = self._verdicts.get(theorem_id)
        if verdict is None:
            self._require(theorem_id)
            raise AssertionError("unreachable")  # pragma: no cover
        if verdict.replayable:
            return RecordedProof(theorem_id, True, len(verdict.tactics), verdict.tactics)
        return RecordedProof(theorem_id, False, None, self._tactics.get(theorem_id, ()), verdict.message, verdict.category)

    def connected_proofs(self) -> list[RecordedProof]:
        """The recorded proofs of the replayable theorems, in file order."""
        return [self.recorded_proof(name) for name in self.startable_ids]

    def _require(self, theorem_id: str) -> str:
        """The root of a replayable theorem; `EnvironmentStartError` otherwise."""
        root = self._roots.get(theorem_id)
        if root is not None:
            return root
        verdict = self._verdicts.get(theorem_id)
        if verdict is not None:
            raise NotReplayableError(f"theorem {theorem_id!r} is {verdict.message}")
        raise EnvironmentStartError(f"theorem {theorem_id!r} is not in the replay data ({len(self._roots)} theorems can be opened)")

    # ------------------------------------------------------------ environment

    def start(self, theorem: Theorem) -> ProofState:
        return ProofState(pp=self._require(theorem.id), handle=theorem.id)

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
        after = step(self._edges, state_pp, key)
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
        """Re-walk `tactics` from the theorem's own root (its statement's goal), independently
        of any search graph: ok iff every step applies, none runs after the goal list is
        empty, and the last one leaves no goal (one goal closed while others remain is
        not a proof)."""
        try:
            state = self._require(theorem.id)
        except EnvironmentStartError as err:
            return Verification(False, str(err))
        if not tactics:
            return Verification(False, "empty proof: unsolved goals")
        for index, tactic in enumerate(tactics):
            result = self._transition(state, tactic)
            if isinstance(result, Failed):
                return Verification(False, f"step {index + 1} ({tactic!r}): {result.message}")
            if isinstance(result, Proved):
                if index + 1 < len(tactics):
                    return Verification(False, f"step {index + 2} ({tactics[index + 1]!r}): no goals to be proved")
                return Verification(True)
            state = result.state.pp
        remaining = split_goals(state)
        count = f"{len(remaining)} goal(s)" if remaining is not None else "goals"
        return Verification(False, f"unsolved goals after {len(tactics)} tactics ({count} left):\n{state}")

    def __enter__(self) -> "ReplayEnvironment":
        return self

    def __exit__(self, *exc: object) -> None:
        return None
