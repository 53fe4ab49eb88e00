"""Issue 10, replay environment: only a tactic proof of the whole statement is replayable,
the goal stack is modelled (bullets, several goals), verification re-walks from the
theorem's own root, and the sample's replayability counts are what the README states."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prover.cli import app
from prover.replay import NO_GOALS, NotReplayableError, ReplayEnvironment
from prover.replayability import (
    FOREIGN_TACTICS,
    KNOWN_NOT_TACTIC_PROOF,
    NO_TRACED_TACTICS,
    PROOF_NOT_AT_END,
    ROOT_NOT_STATEMENT,
    TRACE_INCOMPLETE,
    acts_on_main_goal_only,
    analyse_theorem,
    has_metavariable,
    load_exclusions,
    nested_in,
    split_goals,
)
from prover.runner import GeneratorSpec, ProveSettings, make_generators, prove
from prover.theorems import find_theorem, load_leandojo
from search.budget import Budget
from search.result import Status
from search.types import Failed, ProofState, Progress, Proved, Theorem
from training.data import SAMPLE_PATH, BenchmarkTheorem, TracedTactic, read_benchmark

COMAP = "MeasureTheory.OuterMeasure.comap_ofFunction"
BULLETS = "Polynomial.Monic.degree_mul_comm"  # by_cases, then `·` bullets LeanDojo drops
README = Path(__file__).resolve().parents[1] / "README.md"

# The sample's verdicts, computed by `analyse_theorem` and stated in the README's Data section.
SAMPLE_COUNTS = {
    "theorems": 108,
    "replayable": 40,
    "not_replayable": 68,
    "reasons": {NO_TRACED_TACTICS: 53, ROOT_NOT_STATEMENT: 3, PROOF_NOT_AT_END: 10, TRACE_INCOMPLETE: 1, KNOWN_NOT_TACTIC_PROOF: 1},
}
# Checked against their Mathlib source: term-mode proofs and a statement whose traced `by`
# block is its only traced part. The replay "proved" every one of them before (side goals).
NOT_TACTIC_PROOFS = {
    "antisymm_iff": PROOF_NOT_AT_END,  # ⟨fun h => antisymm h.1 h.2, by\n rintro rfl\n exact ⟨refl _, refl _⟩⟩
    "Order.pred_eq_iff_covBy": PROOF_NOT_AT_END,  # ⟨by\n rintro rfl\n exact pred_covBy _, CovBy.pred_eq⟩
    "Booleanisation.lift_le_lift": PROOF_NOT_AT_END,  # ⟨by rintro ⟨_⟩; assumption, LE.lift⟩
    "Finset.noncommProd_singleton": PROOF_NOT_AT_END,  # noncommProd {a} f (by norm_cast; exact …) = f a := by simp […]
    "PowerSeries.ker_coeff_eq_max_ideal": ROOT_NOT_STATEMENT,  # Ideal.ext fun _ ↦ by\n rw […]
    "SetTheory.PGame.zero_lf_inv'": KNOWN_NOT_TACTIC_PROOF,  # | ⟨xl, xr, xL, xR⟩ => by\n convert …\n rfl
}


def _theorem(name: str, steps: list[tuple[str, str, str]]) -> BenchmarkTheorem:
    """A declaration laid out as `theorem … := by` then one tactic per line, indented by 2:
    it ends (LeanDojo's `end`, 1-based, just past the last character) after its last tactic."""
    end = (1 + sum(len(t.split("\n")) for _, t, _ in steps), 3 + len(steps[-1][1].split("\n")[-1])) if steps else (2, 1)
    return BenchmarkTheorem(
        full_name=name, file_path="F.lean", url="u", commit="c", start=(1, 1), end=end,
        traced_tactics=[TracedTactic(t, t, before, after) for before, t, after in steps],
    )


def _goal(hyps: str, target: str, tag: str = "") -> str:
    return (f"case {tag}\n" if tag else "") + (hyps + "\n" if hyps else "") + f"⊢ {target}"


@pytest.fixture(scope="module")
def sample() -> dict[str, BenchmarkTheorem]:
    return {t.full_name: t for t in read_benchmark(SAMPLE_PATH)}


@pytest.fixture(scope="module")
def replay() -> ReplayEnvironment:
    return ReplayEnvironment.from_benchmark()


def _prove(replay: ReplayEnvironment, name: str, strategy: str = "best_first"):
    budget = Budget(max_expansions=60, tactics_per_expansion=8) if strategy == "best_first" else Budget(max_passes=400)
    settings = ProveSettings(strategy=strategy, budget=budget, generator=GeneratorSpec(kind="oracle", oracle_seed=0))
    return prove(find_theorem(load_leandojo(), name), replay, make_generators(settings.generator, env=replay), settings)


# ------------------------------------------------------------------ defect 1: side-goal root


def test_comap_of_function_is_not_proved(replay: ReplayEnvironment) -> None:
    """The statement's `by simp; simp [m_empty]` block came first in the trace and was taken
    as the theorem: the replay proved that side goal and reported the theorem proved."""
    verdict = replay.replayability(COMAP)
    assert not verdict.replayable and verdict.category == ROOT_NOT_STATEMENT
    assert COMAP in replay and COMAP not in replay.startable_ids
    with pytest.raises(NotReplayableError, match=r"not replayable \[root_not_statement\]"):
        replay.start(Theorem(COMAP))
    for strategy in ("best_first", "sampling"):
        result = _prove(replay, COMAP, strategy)
        assert not result.proved and result.status is Status.ERROR and result.proof is None
        assert "not replayable [root_not_statement]" in result.errors[0]
    # The side goal's own proof no longer verifies as a proof of the theorem.
    assert not replay.verify(Theorem(COMAP), ["simp", "simp [m_empty]"]).ok


def test_prove_cli_prints_the_reason_and_exits_1(replay: ReplayEnvironment) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["prove", "--name", COMAP, "--generator", "oracle"])
    assert result.exit_code == 1, result.output
    assert "not replayable" in result.output and "root_not_statement" in result.output
    as_json = runner.invoke(app, ["prove", "--name", COMAP, "--generator", "oracle", "--json"])
    record = json.loads(as_json.stdout)
    assert as_json.exit_code == 1 and record["status"] == "error" and "not replayable" in record["errors"][0]
    no_tactics = runner.invoke(app, ["prove", "--name", replay.without_tactics[0], "--generator", "oracle"])
    assert no_tactics.exit_code == 1 and "no_traced_tactics" in no_tactics.output


@pytest.mark.parametrize("name", sorted(NOT_TACTIC_PROOFS))
def test_term_mode_proofs_are_not_proved(replay: ReplayEnvironment, name: str) -> None:
    """Their traced tactics prove a side goal (one direction of an `↔`, a statement's
    argument, a case of a match) and replay from it closed: the replay used to report the
    theorem proved."""
    verdict = replay.replayability(name)
    assert not verdict.replayable and verdict.category == NOT_TACTIC_PROOFS[name]
    result = _prove(replay, name)
    assert not result.proved and result.status is Status.ERROR and f"[{NOT_TACTIC_PROOFS[name]}]" in result.errors[0]
    assert not replay.verify(Theorem(name), list(replay.traced_tactics_of(name))).ok


def test_what_data_cannot_show_is_an_annotation(sample: dict[str, BenchmarkTheorem]) -> None:
    """A match case's `by` block laid out like a tactic proof passes the data-only rule
    (the documented limit); the bundled annotation, from its Mathlib source, refuses it."""
    name = "SetTheory.PGame.zero_lf_inv'"
    theorem = sample[name]
    assert analyse_theorem(name, theorem.traced_tactics, (theorem.start, theorem.end)).replayable
    assert name in load_exclusions()
    assert ReplayEnvironment([theorem], exclusions={}).startable_ids == [name]
    assert ReplayEnvironment([theorem]).replayability(name).category == KNOWN_NOT_TACTIC_PROOF


def test_the_end_check_needs_a_traced_tactic_on_the_last_line() -> None:
    root, steps = _goal("", "P"), [(_goal("", "P"), "exact ⟨a, b⟩", NO_GOALS)]
    laid_out = _theorem("t", steps)
    assert analyse_theorem("t", laid_out.traced_tactics, (laid_out.start, laid_out.end)).replayable
    closing_bracket = (laid_out.start, (laid_out.end[0], laid_out.end[1] + 1))  # `…, by\n  exact ⟨a, b⟩⟩`
    one_line = ((1, 1), (1, 40))
    for span in (closing_bracket, one_line, None):
        verdict = analyse_theorem("t", laid_out.traced_tactics, span)
        assert not verdict.replayable and verdict.category == PROOF_NOT_AT_END and verdict.root == root


def test_comap_without_its_metavariables_is_still_refused(sample: dict[str, BenchmarkTheorem]) -> None:
    """Defence in depth: with the statement block's universe metavariable renamed away,
    the real proof's tactics start from a goal the side goal's proof never reaches."""
    traced = [replace(t, state_before=t.state_before.replace("?u.25201", "u_2"), state_after=t.state_after.replace("?u.25201", "u_2"))
              for t in sample[COMAP].traced_tactics]
    verdict = analyse_theorem(COMAP, traced, (sample[COMAP].start, sample[COMAP].end))
    assert not verdict.replayable and verdict.category == FOREIGN_TACTICS
    assert "refine le_antisymm" in verdict.detail


def test_a_side_goal_root_is_refused() -> None:
    ctx = "x : ℕ"
    tagged = _theorem("tagged", [(_goal(ctx, "x = x", "h"), "rfl", NO_GOALS)])
    two_goals = _theorem("two", [(_goal(ctx, "A") + "\n\n" + _goal(ctx, "B"), "exacts [a, b]", NO_GOALS)])
    metavariable = _theorem("mvar", [(_goal("β : Type ?u.12", "P"), "simp", NO_GOALS)])
    # `theorem s (h : Q := by simp) : P := by exact foo` — the statement's block comes first.
    statement_block = _theorem("stmt", [(_goal(ctx, "Q"), "simp", NO_GOALS), (_goal(ctx + "\nh : Q", "P"), "exact foo", NO_GOALS)])
    # `theorem t : A ∧ B := ⟨by simp, by ring⟩` — a term-mode proof with two blocks.
    term_mode = _theorem("term", [(_goal(ctx, "A"), "simp", NO_GOALS), (_goal(ctx, "B"), "ring", NO_GOALS)])
    env = ReplayEnvironment([tagged, two_goals, metavariable, statement_block, term_mode])
    assert env.startable_ids == []
    assert {n: v.category for n, v in env.not_replayable.items()} == {
        "tagged": ROOT_NOT_STATEMENT, "two": ROOT_NOT_STATEMENT, "mvar": ROOT_NOT_STATEMENT,
        "stmt": FOREIGN_TACTICS, "term": FOREIGN_TACTICS,
    }
    for name in env.theorem_ids:
        with pytest.raises(NotReplayableError):
            env.start(Theorem(name))
        assert not env.verify(Theorem(name), ["simp"]).ok


def test_nested_tactics_are_part_of_the_proof() -> None:
    """`have h : Q := by simp` traces `simp` on the side goal `Q` after the have: that is a
    nested block of a proof step, not a foreign proof."""
    root, after_have = _goal("x : ℕ", "P"), _goal("x : ℕ\nh : Q", "P")
    theorem = _theorem("t", [(root, "have h : Q := by simp", after_have), (after_have, "exact h.p", NO_GOALS), (_goal("x : ℕ", "Q"), "simp", NO_GOALS)])
    verdict = analyse_theorem("t", theorem.traced_tactics, (theorem.start, (3, 3 + len("exact h.p"))))
    assert verdict.replayable and verdict.tactics == ("have h : Q := by simp", "exact h.p")
    assert nested_in("simp", "have h : Q := by simp") and nested_in("simp at ha", "have hy : y ≠ 0 := by rintro rfl; simp at ha")
    assert nested_in("obtain ⟨f⟩ := h", "classical\n  obtain ⟨f⟩ := h\n  exact f")
    assert not nested_in("simp", "simpa using h") and not nested_in("simp", "simp [foo]") and not nested_in("simp", "simp")


# ------------------------------------------------------------ defect 2: verification re-walks


def test_a_partial_proof_leaving_goals_fails_verify(replay: ReplayEnvironment) -> None:
    theorem = Theorem(BULLETS)
    full = list(replay.recorded_proof(BULLETS).tactics)
    assert replay.verify(theorem, full).ok
    for cut in range(1, len(full)):
        verdict = replay.verify(theorem, full[:cut])
        assert not verdict.ok and "unsolved goals" in verdict.message
    # Closing the first goal of two leaves the second: progress, never `Proved`.
    root = replay.start(theorem)
    split = replay.apply(root, full[0])
    assert isinstance(split, Progress) and len(split_goals(split.state.pp)) == 2
    closed_first = replay.apply(split.state, "simp [h]")
    assert isinstance(closed_first, Progress) and split_goals(closed_first.state.pp) == split_goals(split.state.pp)[1:]
    two_left = replay.verify(theorem, full[:2])
    assert "1 goal(s) left" in two_left.message


def test_verify_rewalks_from_the_theorems_own_root() -> None:
    a, b = _goal("", "A"), _goal("", "B")
    env = ReplayEnvironment([
        _theorem("pair", [(_goal("", "A ∧ B"), "constructor", f"{a}\n\n{b}"), (a, "exact ha", NO_GOALS), (b, "exact hb", NO_GOALS)]),
        _theorem("just_b", [(b, "exact hb", NO_GOALS)]),
    ])
    pair = Theorem("pair")
    assert env.verify(pair, ["constructor", "exact ha", "exact hb"]).ok
    only_first = env.verify(pair, ["constructor", "exact ha"])
    assert not only_first.ok and "unsolved goals" in only_first.message and "⊢ B" in only_first.message
    # A proof of another theorem's root is not a proof of this one, nor the reverse.
    assert not env.verify(pair, ["exact hb"]).ok
    assert env.verify(Theorem("just_b"), ["exact hb"]).ok and not env.verify(Theorem("just_b"), ["constructor"]).ok
    # Focused steps act on the first goal only: `exact hb` does not apply while `A` is first.
    split = env.apply(env.start(pair), "constructor")
    assert isinstance(split, Progress) and isinstance(env.apply(split.state, "exact hb"), Failed)
    assert env.apply(ProofState(b), "exact hb") == Proved()


# -------------------------------------------------------- defect 3: bullets and several goals


@pytest.mark.parametrize("strategy", ["best_first", "sampling"])
def test_a_bullet_proof_from_the_sample_is_replayable_and_proved(replay: ReplayEnvironment, strategy: str) -> None:
    proof = replay.recorded_proof(BULLETS)
    assert proof.replayable and proof.length == 5
    result = _prove(replay, BULLETS, strategy)
    assert result.proved and result.verified and replay.verify(Theorem(BULLETS), result.proof).ok


def test_cli_proves_the_bullet_proof() -> None:
    result = CliRunner().invoke(app, ["prove", "--name", "CancelDenoms.cancel_factors_lt", "--generator", "oracle"])
    assert result.exit_code == 0, result.output
    assert "exact mul_pos had hbd" in result.output and "exact one_div_pos.2 hgcd" in result.output


def test_focusing_is_refused_where_it_would_be_unsound() -> None:
    a, b = _goal("", "A"), _goal("", "B")
    with_mvar = _goal("", "P ?w", "h")
    env = ReplayEnvironment([
        _theorem("t", [(_goal("", "A ∧ B"), "constructor", f"{a}\n\n{b}"), (a, "all_goals simp", NO_GOALS), (a, "exact ha", NO_GOALS), (b, "exact hb", NO_GOALS)]),
        _theorem("m", [(_goal("", "∃ w, P w"), "refine ⟨?w, ?h⟩", f"{with_mvar}\n\n{_goal('', 'ℕ', 'w')}"), (with_mvar, "exact p 3", NO_GOALS)]),
    ])
    split = env.apply(env.start(Theorem("t")), "constructor")
    assert isinstance(split, Progress)
    assert isinstance(env.apply(split.state, "all_goals simp"), Failed)  # acts on every goal
    assert isinstance(env.apply(split.state, "exact ha"), Progress)
    assert "all_goals simp" not in env.recorded_tactics(split.state.pp) and "exact ha" in env.recorded_tactics(split.state.pp)
    # Closing `P ?w` assigns `?w`: the carried goal would change, so nothing applies focused.
    mid = env.apply(ProofState(_goal("", "∃ w, P w")), "refine ⟨?w, ?h⟩")
    assert isinstance(mid, Progress) and isinstance(env.apply(mid.state, "exact p 3"), Failed)
    assert env.replayability("m").category == TRACE_INCOMPLETE
    assert not acts_on_main_goal_only("exacts [a, b]") and not acts_on_main_goal_only("(simp; ring)")
    assert acts_on_main_goal_only("apply and_congr <;> rw [h]") and not acts_on_main_goal_only("classical simp ring")
    assert has_metavariable("⊢ ?m.12 = 1") and not has_metavariable("⊢ l.head? = some a")


# ------------------------------------------------------------------------ defect 4: counts


def test_sample_counts_are_as_stated(replay: ReplayEnvironment) -> None:
    assert replay.replayability_counts() == SAMPLE_COUNTS
    assert len(replay.startable_ids) == len(replay.connected_proofs()) == SAMPLE_COUNTS["replayable"]
    assert set(replay.not_replayable) | set(replay.startable_ids) == set(replay.theorem_ids)
    for proof in replay.connected_proofs():
        assert replay.verify(Theorem(proof.theorem_id), list(proof.tactics)).ok
    for name, verdict in replay.not_replayable.items():
        assert verdict.message.startswith(f"not replayable [{verdict.category}]")
        assert not replay.verify(Theorem(name), list(replay.traced_tactics_of(name)) or ["simp"]).ok


def test_readme_states_the_counts() -> None:
    data = README.read_text(encoding="utf-8").split("## Data", 1)[1].split("\n## ", 1)[0]
    text = " ".join(data.split())
    found = re.search(r"(\d+) are replayable.*?(\d+) are not: (\d+) without traced tactics.*?(\d+) whose first traced goal "
                      r"is not a statement's goal.*?(\d+) that do not end with a traced tactic.*?(\d+) whose traced tactics do not close"
                      r".*?(\d+) refused by an annotation", text)
    assert found, "README's Data section must state the replayability counts"
    reasons = SAMPLE_COUNTS["reasons"]
    assert tuple(int(g) for g in found.groups()) == (
        SAMPLE_COUNTS["replayable"], SAMPLE_COUNTS["not_replayable"], reasons[NO_TRACED_TACTICS],
        reasons[ROOT_NOT_STATEMENT], reasons[PROOF_NOT_AT_END], reasons[TRACE_INCOMPLETE], reasons[KNOWN_NOT_TACTIC_PROOF],
    )


def test_every_eval_summary_counts_replayability() -> None:
    """Refused theorems stay in the denominator (as errors) and are counted by reason; the
    table says so. Runs on other environments report no refusal."""
    from prover.eval.records import records_for_theorem
    from prover.eval.report import table_markdown
    from prover.eval.summary import summarize
    from search.result import SearchResult

    def group(theorem_id: str, status: Status, errors: list[str]):
        result = SearchResult(theorem_id, status, "best_first", errors=errors)
        if status is Status.PROVED:
            result.proof, result.verified = ["simp"], True
        return records_for_theorem("b", theorem_id, result, {"oracle": result})

    records = [
        *group("ok", Status.PROVED, []),
        *group("side", Status.ERROR, ["env_start: environment could not start 'side': theorem 'side' is not replayable [root_not_statement]: …"]),
        *group("term", Status.ERROR, ["env_start: … is not replayable [proof_not_at_end]: …"]),
        *group("lean", Status.ERROR, ["env_start: REPL failed while opening the statement"]),
    ]
    summary = summarize(records, strategy="best_first")
    info = summary["benchmarks"]["b"]
    assert info["rows"]["ensemble"]["theorems"] == 4 and info["rows"]["ensemble"]["proved"] == 1
    assert info["replayability"] == {"theorems": 4, "replayable": 2, "not_replayable": 2,
                                     "reasons": {ROOT_NOT_STATEMENT: 1, PROOF_NOT_AT_END: 1}}
    table = table_markdown(summary, budget=Budget().to_json(), ensemble="independent")
    assert "2 of 4 theorem(s) not replayable (root_not_statement 1, proof_not_at_end 1): in the denominator as not proved, not errors" in table
    other = summarize(group("x", Status.FAILED, []), strategy="best_first")["benchmarks"]["b"]["replayability"]
    assert other == {"theorems": 1, "replayable": 1, "not_replayable": 0, "reasons": {}}
