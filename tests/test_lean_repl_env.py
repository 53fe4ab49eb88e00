"""`ReplEnvironment` start/apply/verify over Lean's real recorded sessions (fake REPL replay),
plus a scripted REPL for flows the recordings do not contain (complete-proof verification)."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest

import fake_repl
from prover.lean.process import ReplConfig
from prover.lean.repl_env import ReplEnvironment, ReplHandle, proof_command
from prover.lean.untrusted import check_statement
from search.types import (
    EnvironmentStartError,
    Failed,
    FailureKind,
    ProofEnvironment,
    ProofState,
    Progress,
    Proved,
    Theorem,
)
from test_lean_process import assert_group_gone, gone

ROOT = Path(__file__).resolve().parents[1]
SESSIONS = fake_repl.load_sessions()

COMPLEX_AND = Theorem("complex_and", "theorem complex_and (p q r : Prop) (h1 : p ∧ q) (h2 : q → r) : p ∧ r := by\n")
COMPLEX_AND_PROOF = ["apply And.intro", "exact h1.left", "apply h2", "exact h1.right"]


def recorded(session: str, index: int) -> dict:
    return json.loads(SESSIONS[session][1][index])


def env_for(*flags: object, rebuild: bool = True, **overrides) -> ReplEnvironment:
    # Sandboxed where bwrap works (prover.lean.sandbox); scripts and logs live under the temp dir.
    cfg = dict(command=fake_repl.fake_command(*flags), cwd=ROOT, memory_limit_mb=1024, close_grace_s=0.1,
               sandbox_writable=(Path(tempfile.gettempdir()),))
    cfg.update(overrides)
    return ReplEnvironment(ReplConfig(**cfg), max_processes=2, rebuild_stale_states=rebuild)


def scripted_env(tmp_path: Path, script: dict, *flags: object, **kw) -> ReplEnvironment:
    path = tmp_path / "script.json"
    path.write_text(json.dumps(script, ensure_ascii=False), encoding="utf-8")
    return env_for("--script", path, *flags, **kw)


def test_is_a_proof_environment():
    with env_for() as env:
        assert isinstance(env, ProofEnvironment)


def test_recorded_branching_proof_runs_to_proved():
    with env_for() as env:
        root = env.start(COMPLEX_AND)
        assert root.pp == recorded("core/proof_branching", 0)["sorries"][0]["goal"]
        assert isinstance(root.handle, ReplHandle) and root.handle.proof_state == 0
        state = root
        for i, tactic in enumerate(COMPLEX_AND_PROOF[:-1], 1):
            result = env.apply(state, tactic)
            assert isinstance(result, Progress), result
            assert result.state.pp == "\n\n".join(recorded("core/proof_branching", i)["goals"])
            assert result.state.handle.path == tuple(COMPLEX_AND_PROOF[:i])
            state = result.state
        assert isinstance(env.apply(state, COMPLEX_AND_PROOF[-1]), Proved)


def test_recorded_by_cases_progress_then_given_up():
    with env_for() as env:
        root = env.start(Theorem("foo", "theorem foo (x : Int) : x = x := by sorry"))
        split = env.apply(root, "by_cases h : x < 0")
        assert isinstance(split, Progress) and split.state.pp.count("⊢") == 2
        one = env.apply(split.state, "case pos => rfl")
        assert isinstance(one, Progress) and one.state.pp.startswith("case neg")
        given_up = env.apply(split.state, "all_goals sorry")
        assert isinstance(given_up, Failed) and given_up.kind == FailureKind.GIVEN_UP


def test_recorded_mathlib_header_and_reused_header_environment(tmp_path):
    log = tmp_path / "requests.jsonl"
    with env_for("--request-log", log) as env:
        root = env.start(Theorem("test", "theorem test : 0 < 1 := by", header="import Mathlib"))
        assert root.pp == "⊢ 0 < 1"
        assert isinstance(env.apply(root, "exact?"), Proved)
        second = env.start(Theorem("test", "theorem test : 3 = 7 := by", header="import Mathlib"))
        assert second.handle.slot == root.handle.slot
        failed = env.apply(second, "exact?")
        assert isinstance(failed, Failed) and failed.kind == FailureKind.LEAN_ERROR
        assert failed.message.startswith("`exact?` could not close the goal")
    sent = [json.loads(line) for line in log.read_text().splitlines()]
    assert sent[0] == {"cmd": "import Mathlib"}
    assert sum("import" in r.get("cmd", "") for r in sent) == 1  # imported once for both theorems


def test_recorded_induction_branches_from_one_state():
    with env_for() as env:
        root = env.start(Theorem("foo", "theorem foo (x : Nat) : x = x := by", header="import Mathlib"))
        assert root.pp == "x : ℕ\n⊢ x = x"
        split = env.apply(root, "induction x")
        assert isinstance(split, Progress)
        assert split.state.pp == "\n\n".join(recorded("mathlib/induction", 2)["goals"])
        assert isinstance(env.apply(split.state, "next => rfl"), Progress)
        sorry = env.apply(root, "induction x with\n| zero => sorry\n| succ x => sorry")
        assert isinstance(sorry, Failed) and sorry.kind == FailureKind.GIVEN_UP


def test_recorded_elaboration_error_is_a_lean_error():
    with env_for() as env:
        root = env.start(Theorem("my_theorem", "theorem my_theorem (x : Nat) : x = x := by sorry"))
        result = env.apply(root, "exact my_fake_premise")
        assert isinstance(result, Failed) and result.kind == FailureKind.LEAN_ERROR
        assert result.message == "Unknown identifier `my_fake_premise`"


def test_recorded_failed_proof_is_not_verified(tmp_path):
    # Lean's recorded answer to this proof (core/have_by_sorry), given to the renamed command.
    theorem, tactics = Theorem("foo", "theorem foo (x : Int) : x = x := by"), ["have h : x = 1 := by sorry"]
    assert SESSIONS["core/have_by_sorry"][0][0] == {"cmd": "theorem foo (x : Int) : x = x := by\n  have h : x = 1 := by sorry"}
    script = _verify_script(theorem, tactics, recorded("core/have_by_sorry", 0), [])
    with scripted_env(tmp_path, script) as env:
        v = env.verify(theorem, tactics)
        assert not v.ok and "unsolved goals" in v.message


FRESH = r"dco_verify_[0-9a-f]{32}"


def _verify_script(theorem: Theorem, tactics: list[str], proof_response: dict, axioms: list[str],
                   constants: list[dict] | None = None) -> dict:
    """A script whose proof command (any fresh name) gets `proof_response`; the declared
    constant holds `axioms`, which the fake's `#print axioms` reports as Lean does."""
    command, name = proof_command(check_statement(theorem.statement), tactics, name="NAME")
    pattern = re.escape(command).replace("NAME", FRESH)
    return {"commands": [{"cmd_regex": pattern, "response": proof_response, "axioms": axioms}],
            "constants": constants or []}


@pytest.mark.parametrize(
    "proof_response, axioms, ok, message",
    [
        ({}, [], True, "verified; axioms: none"),
        ({}, ["propext", "Classical.choice", "Quot.sound"], True, "verified; axioms: Classical.choice, Quot.sound, propext"),
        ({}, ["propext", "sorryAx"], False, "disallowed axioms: sorryAx"),
        ({}, ["Lean.ofReduceBool"], False, "disallowed axioms: Lean.ofReduceBool"),
        ({}, ["propext", "Lean.trustCompiler"], False, "disallowed axioms: Lean.trustCompiler"),
        ({}, ["my_axiom"], False, "disallowed axioms: my_axiom"),
        ({"messages": [{"severity": "warning", "pos": {"line": 1, "column": 8}, "endPos": {"line": 1, "column": 19},
                        "data": "declaration uses `sorry`"}]}, ["sorryAx"], False, "uses `sorry`"),
        ({"messages": [{"severity": "error", "pos": {"line": 3, "column": 2}, "endPos": {"line": 3, "column": 7},
                        "data": "type mismatch"}]}, [], False, "Lean reported errors: type mismatch"),
    ],
)
def test_verification_accepts_only_clean_proofs(tmp_path, proof_response, axioms, ok, message):
    with scripted_env(tmp_path, _verify_script(COMPLEX_AND, COMPLEX_AND_PROOF, proof_response, axioms)) as env:
        v = env.verify(COMPLEX_AND, COMPLEX_AND_PROOF)
        assert v.ok is ok and message in v.message, v


PROTECTED = Theorem("Nat.lt_irrefl'", "namespace Nat\nprotected theorem lt_irrefl' (n : ℕ) : ¬n < n := by", header="import Mathlib")


def test_protected_declaration_cannot_point_the_audit_at_another_constant(tmp_path):
    """Defect: `#print axioms lt_irrefl'` inside `namespace Nat` skips the protected
    `Nat.lt_irrefl'` and audits a root `lt_irrefl'` (clean); the proof itself used
    `Lean.ofReduceBool`. The verifier now audits its own fresh constant."""
    root_lemma = [{"name": "lt_irrefl'", "axioms": []}]
    script = _verify_script(PROTECTED, ["decide"], {}, ["propext", "Lean.ofReduceBool"], constants=root_lemma)
    # What the previous verifier sent, answered the way Lean answers it:
    script["commands"].append({"cmd": "namespace Nat\nprotected theorem lt_irrefl' (n : ℕ) : ¬n < n := by\n  decide",
                               "response": {}, "axioms": ["propext", "Lean.ofReduceBool"]})
    log = tmp_path / "requests.jsonl"
    with scripted_env(tmp_path, script, "--request-log", log) as env:
        v = env.verify(PROTECTED, ["decide"])
    assert not v.ok and "disallowed axioms: Lean.ofReduceBool" in v.message, v
    sent = [json.loads(line) for line in log.read_text().splitlines()]
    command, audit = sent[-2]["cmd"], sent[-1]["cmd"]
    name = re.fullmatch(r"#print axioms (" + FRESH + ")", audit).group(1)
    assert command == f"namespace Nat\ntheorem {name} (n : ℕ) : ¬n < n := by\n  decide"


def test_the_report_must_name_the_fresh_constant(tmp_path):
    from prover.lean.verification import audit_axioms

    fresh = "dco_verify_" + "0" * 32
    assert audit_axioms([f"'Nat.{fresh}' depends on axioms: [propext]"], fresh).ok
    assert audit_axioms([f"'{fresh}' does not depend on any axioms"], fresh).ok
    for bad in ([f"'lt_irrefl' does not depend on any axioms"], [f"'x{fresh}' does not depend on any axioms"],
                [f"'{fresh}' does not depend on any axioms", f"'{fresh}' does not depend on any axioms"], [],
                [f"'{fresh}' depends on axioms: [propext] trailing"], [f"'{fresh}' depends on axioms: [Lean.ofReduceBool]"]):
        assert not audit_axioms(bad, fresh).ok, bad


def test_fresh_name_differs_per_verification_and_statement_meaning_is_kept():
    stmt = check_statement("open Real\nnamespace A\n@[simp] private theorem B.c (x : ℝ) : x = x := by sorry")
    c1, n1 = proof_command(stmt, ["rfl"])
    c2, n2 = proof_command(stmt, ["rfl"])
    assert n1 != n2 and re.fullmatch(FRESH, n1)
    assert c1 == f"open Real\nnamespace A\ntheorem B.{n1} (x : ℝ) : x = x := by\n  rfl"
    assert "@[simp]" not in c1 and "private" not in c1
    # `open ... in` still applies to the declaration; a dotted «name» component stays one component
    c3, n3 = proof_command(check_statement("open Foo in\ntheorem Foo.«a.b» : True := by"), ["trivial"])
    assert c3 == f"open Foo in\ntheorem Foo.{n3} : True := by\n  trivial"
    from prover.lean.verification import verification_command
    check = verification_command(check_statement("theorem _root_.«x.y».z : True := by"), ["trivial"], n3)
    assert check.text.startswith(f"theorem _root_.«x.y».{n3} :") and check.query == f"«x.y».{n3}"


def test_example_is_renamed_so_its_axioms_can_be_printed(tmp_path):
    theorem = Theorem("ex", "example (p : Prop) (h : p) : p := by sorry", header="import Mathlib\nopen Real")
    command, name = proof_command(check_statement(theorem.statement), ["exact h"])
    assert command.startswith(f"theorem {name} (p : Prop)") and command.endswith(":= by\n  exact h")
    with scripted_env(tmp_path, _verify_script(theorem, ["exact h"], {}, ["propext"])) as env:
        assert env.verify(theorem, ["exact h"]).ok


def test_multiline_tactics_are_indented_as_one_block():
    stmt = check_statement("theorem t (x : Int) : x = x := by")
    command, name = proof_command(stmt, ["have h : x = x := by\n    rfl", "  exact h"])
    assert command == f"theorem {name} (x : Int) : x = x := by\n  have h : x = x := by\n      rfl\n  exact h"


def test_injected_commands_are_rejected_before_lean(tmp_path):
    log = tmp_path / "requests.jsonl"
    with scripted_env(tmp_path, {}, "--request-log", log) as env:
        v = env.verify(COMPLEX_AND, ["apply And.intro\n#eval 1"])
        assert not v.ok and "tactic 1" in v.message and "#eval" in v.message and "2:0" in v.message
        with pytest.raises(EnvironmentStartError, match="rejected"):
            env.start(Theorem("t", "#eval 1\ntheorem t : True := by sorry"))
        with pytest.raises(EnvironmentStartError, match="outside the allowed roots"):
            env.start(Theorem("t", "theorem t : True := by", header="import Lean.Elab"))
        with pytest.raises(EnvironmentStartError, match="no statement"):
            env.start(Theorem("t", ""))
    assert not log.exists()  # nothing reached the REPL


def test_rejected_tactic_and_foreign_handle(tmp_path):
    with env_for() as env:
        root = env.start(COMPLEX_AND)
        bad = env.apply(root, "run_tac pure ()")
        assert isinstance(bad, Failed) and bad.kind == FailureKind.LEAN_ERROR and "run_tac" in bad.message
        foreign = env.apply(ProofState("⊢ True", handle=("not", "ours")), "trivial")
        assert isinstance(foreign, Failed) and foreign.kind == FailureKind.CRASH


def test_statement_that_does_not_elaborate_is_a_start_error(tmp_path):
    script = {"commands": [{"cmd": "theorem t : Foo := by sorry", "response": {"messages": [
        {"severity": "error", "pos": {"line": 1, "column": 12}, "endPos": {"line": 1, "column": 15},
         "data": "unknown identifier 'Foo'"}]}}]}
    with scripted_env(tmp_path, script) as env:
        with pytest.raises(EnvironmentStartError, match="unknown identifier 'Foo'"):
            env.start(Theorem("t", "theorem t : Foo := by"))


def test_timeout_kills_the_process_and_stale_states_are_rebuilt(tmp_path):
    marker = tmp_path / "slow-once"
    with env_for("--slow", 30, "--slow-on", 3, "--slow-once-marker", marker) as env:
        root = env.start(COMPLEX_AND)
        step = env.apply(root, "apply And.intro")
        assert isinstance(step, Progress)
        pid = env.pool.processes()[0].pid
        timed_out = env.apply(step.state, "exact h1.left", timeout_s=0.5)
        assert isinstance(timed_out, Failed) and timed_out.kind == FailureKind.TIMEOUT
        assert gone(pid)
        assert_group_gone(pid)
        # The state now belongs to a dead generation: it is rebuilt from its tactic path.
        again = env.apply(step.state, "exact h1.left")
        assert isinstance(again, Progress), again
        assert again.state.pp == "\n\n".join(recorded("core/proof_branching", 2)["goals"])
        assert again.state.handle.generation == 2
        assert isinstance(env.apply(env.apply(again.state, "apply h2").state, "exact h1.right"), Proved)


def test_stale_state_without_rebuilding_is_a_crash_not_a_wrong_answer(tmp_path):
    marker = tmp_path / "slow-once"
    with env_for("--slow", 30, "--slow-on", 3, "--slow-once-marker", marker, rebuild=False) as env:
        root = env.start(COMPLEX_AND)
        step = env.apply(root, "apply And.intro")
        assert env.apply(step.state, "exact h1.left", timeout_s=0.5).kind == FailureKind.TIMEOUT
        stale = env.apply(step.state, "exact h1.left")
        assert isinstance(stale, Failed) and stale.kind == FailureKind.CRASH and "stale" in stale.message
        fresh = env.start(COMPLEX_AND)  # the environment itself is usable again
        assert isinstance(env.apply(fresh, "apply And.intro"), Progress)


@pytest.mark.parametrize("flag", ["--crash-after", "--garbage-on"])
def test_crash_or_garbage_is_a_crash_of_that_tactic_only(flag):
    value = 2 if flag == "--crash-after" else 3
    with env_for(flag, value, rebuild=False) as env:
        root = env.start(COMPLEX_AND)
        step = env.apply(root, "apply And.intro")
        assert isinstance(step, Progress)
        broken = env.apply(step.state, "exact h1.left")
        assert isinstance(broken, Failed) and broken.kind == FailureKind.CRASH
        fresh = env.start(COMPLEX_AND)
        assert isinstance(env.apply(fresh, "apply And.intro"), Progress)


AUDIT_CASES = json.loads((ROOT / "tests/data/lean_audit/cases.json").read_text(encoding="utf-8"))["cases"]


@pytest.mark.parametrize("case", AUDIT_CASES, ids=[c["id"] for c in AUDIT_CASES])
def test_axiom_audit_cases_end_to_end(tmp_path, case):
    theorem = Theorem("t", case["statement"], header="import Mathlib")
    response = {"messages": case["proof_messages"]} if "proof_messages" in case else {}
    script = _verify_script(theorem, case["tactics"], response, case["proof_axioms"], constants=case.get("constants"))
    with scripted_env(tmp_path, script) as env:
        v = env.verify(theorem, case["tactics"])
    ok, fragment = case["expect"]
    assert v.ok is ok and fragment in v.message, v
