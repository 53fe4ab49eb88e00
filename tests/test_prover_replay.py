"""The replay environment: recorded transitions only, whitespace-insensitive matching,
verification by replay, honest connectivity of recorded proofs."""

from __future__ import annotations

import time

import pytest

from prover.replay import NO_GOALS, ReplayEnvironment, collapse_whitespace
from search.types import EnvironmentStartError, Failed, FailureKind, ProofState, Progress, Proved, Theorem
from training.data import SAMPLE_PATH, BenchmarkTheorem, TracedTactic, read_benchmark


def _theorem(name: str, steps: list[tuple[str, str, str]]) -> BenchmarkTheorem:
    # Laid out as `theorem … := by` then one tactic per line at indentation 2: the
    # declaration ends just past its last tactic (what the replay's end check expects).
    return BenchmarkTheorem(
        full_name=name,
        file_path="F.lean",
        url="u",
        commit="c",
        start=(1, 1),
        end=(1 + sum(len(t.split("\n")) for _, t, _ in steps), 3 + len(steps[-1][1].split("\n")[-1])) if steps else (2, 1),
        traced_tactics=[TracedTactic(t, t, before, after) for before, t, after in steps],
    )


@pytest.fixture(scope="module")
def sample_env() -> ReplayEnvironment:
    return ReplayEnvironment(read_benchmark(SAMPLE_PATH))


def test_recorded_tactic_progresses_and_closes() -> None:
    env = ReplayEnvironment([_theorem("t", [("⊢ A ∧ B", "constructor", "⊢ A\n\n⊢ B"), ("⊢ A\n\n⊢ B", "all_goals simp", NO_GOALS)])])
    root = env.start(Theorem("t"))
    assert root.pp == "⊢ A ∧ B"
    step = env.apply(root, "constructor")
    assert step == Progress(ProofState("⊢ A\n\n⊢ B"))
    assert env.apply(step.state, "all_goals simp") == Proved()


def test_unrecorded_tactic_fails_like_lean() -> None:
    env = ReplayEnvironment([_theorem("t", [("⊢ P", "exact h", NO_GOALS)])])
    result = env.apply(env.start(Theorem("t")), "exact h'")
    assert isinstance(result, Failed) and result.kind is FailureKind.LEAN_ERROR
    assert "error" in result.message and "exact h'" in result.message
    # A state the graph has never seen: nothing applies there.
    assert isinstance(env.apply(ProofState("⊢ Q"), "exact h"), Failed)
    assert env.apply(env.start(Theorem("t")), "sorry") == Failed(FailureKind.GIVEN_UP, "declaration uses 'sorry'")


def test_whitespace_is_normalised() -> None:
    tactic = "rw [foo,\n    bar]"
    env = ReplayEnvironment([_theorem("t", [("⊢ P", tactic, NO_GOALS)])])
    root = env.start(Theorem("t"))
    assert collapse_whitespace(tactic) == "rw [foo, bar]"
    assert env.apply(root, "rw [foo, bar]") == Proved()
    assert env.apply(root, "  rw  [foo,\tbar] \n") == Proved()
    assert isinstance(env.apply(root, "rw [foo,bar]"), Failed)  # removing whitespace is a different text


def test_graph_is_global_across_theorems() -> None:
    env = ReplayEnvironment([
        _theorem("a", [("⊢ P", "intro h", "h : Q\n⊢ R"), ("h : Q\n⊢ R", "exact f h", NO_GOALS)]),
        _theorem("b", [("⊢ S", "apply g", "h : Q\n⊢ R")]),
        _theorem("c", [("⊢ S", "apply g", "h : Q\n⊢ R"), ("h : Q\n⊢ R", "exact f' h", NO_GOALS)]),
    ])
    mid = env.apply(env.start(Theorem("c")), "apply g")
    assert isinstance(mid, Progress)
    assert env.apply(mid.state, "exact f h") == Proved()  # recorded in theorem a
    assert env.verify(Theorem("c"), ["apply g", "exact f h"]).ok
    assert env.recorded_proof("c").tactics == ("apply g", "exact f' h")  # its own proof
    # b's own trace ends with goals left: not replayable, so never opened nor proved.
    assert not env.recorded_proof("b").connected and "trace_incomplete" in env.recorded_proof("b").reason
    assert not env.verify(Theorem("b"), ["apply g", "exact f h"]).ok
    assert env.recorded_proof("a").connected and env.recorded_proof("a").length == 2


def test_start_errors_name_the_problem() -> None:
    env = ReplayEnvironment([_theorem("empty", []), _theorem("t", [("⊢ P", "simp", NO_GOALS)])])
    with pytest.raises(EnvironmentStartError, match=r"not replayable \[no_traced_tactics\]"):
        env.start(Theorem("empty"))
    with pytest.raises(EnvironmentStartError, match="not in the replay data"):
        env.start(Theorem("missing"))
    assert env.without_tactics == ["empty"] and env.startable_ids == ["t"]


def test_verify_replays_from_the_root() -> None:
    env = ReplayEnvironment([_theorem("t", [("⊢ P", "intro", "⊢ Q"), ("⊢ Q", "simp", NO_GOALS)])])
    theorem = Theorem("t")
    assert env.verify(theorem, ["intro", "simp"]).ok
    assert env.verify(theorem, ["intro  ", "\nsimp"]).ok
    unfinished = env.verify(theorem, ["intro"])
    assert not unfinished.ok and "unsolved goals" in unfinished.message
    wrong = env.verify(theorem, ["simp"])
    assert not wrong.ok and "step 1" in wrong.message
    extra = env.verify(theorem, ["intro", "simp", "rfl"])
    assert not extra.ok and "no goals to be proved" in extra.message
    assert not env.verify(theorem, []).ok
    assert not env.verify(Theorem("nope"), ["simp"]).ok


def test_conflicting_records_keep_the_first_and_are_counted() -> None:
    env = ReplayEnvironment([
        _theorem("a", [("⊢ P", "simp", NO_GOALS)]),
        _theorem("b", [("⊢ P", "simp", "⊢ Q")]),
        _theorem("a", [("⊢ X", "simp", NO_GOALS)]),
    ])
    assert env.conflicts == 1 and env.duplicate_ids == ["a"]
    assert env.apply(ProofState("⊢ P"), "simp") == Proved()


def test_sample_connectivity_is_computed_by_replay(sample_env: ReplayEnvironment) -> None:
    # 108 theorems, 55 with traced tactics; a proof is connected (replayable) iff its own
    # traced tactics close its statement's goal (`prover.replayability`).
    assert len(sample_env.theorem_ids) == 108 and len(sample_env.without_tactics) == 53
    connected = sample_env.connected_proofs()
    assert len(connected) == len(sample_env.startable_ids) == 40
    for proof in connected:
        assert sample_env.verify(Theorem(proof.theorem_id), list(proof.tactics)).ok
    broken = [sample_env.recorded_proof(n) for n in sample_env.theorem_ids if n not in sample_env.without_tactics and not sample_env.recorded_proof(n).connected]
    assert len(broken) == 15
    for proof in broken:
        assert proof.reason.startswith("not replayable [") and proof.category
        assert not sample_env.verify(Theorem(proof.theorem_id), list(proof.tactics)).ok
    lengths = sorted(p.length for p in connected)
    assert lengths[0] == 1 and lengths[-1] == 11


def test_latency_and_timeout() -> None:
    env = ReplayEnvironment([_theorem("t", [("⊢ P", "simp", NO_GOALS)])], latency_s=0.05)
    root = env.start(Theorem("t"))
    start = time.perf_counter()
    assert env.apply(root, "simp") == Proved()
    assert time.perf_counter() - start >= 0.05
    timed_out = env.apply(root, "simp", timeout_s=0.01)
    assert isinstance(timed_out, Failed) and timed_out.kind is FailureKind.TIMEOUT
    with pytest.raises(ValueError):
        ReplayEnvironment([], latency_s=-1)
