"""`DojoEnvironment` mapping, restarts and verification.

The real `lean_dojo` needs Lean and a traced Mathlib, so the mapping is exercised with a
Dojo double built from LeanDojo Benchmark 4's real traced tactics (bundled): states are the
recorded `state_before`/`state_after` strings, transitions the recorded tactics.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest

from prover.lean.dojo_env import DojoApi, DojoEnvironment, LeanDojoUnavailable, load_lean_dojo
from search.types import EnvironmentStartError, Failed, FailureKind, ProofEnvironment, Progress, Proved, Theorem

ROOT = Path(__file__).resolve().parents[1]
BENCH = json.loads((ROOT / "training/resources/leandojo_benchmark_4/random_test_head.json").read_text(encoding="utf-8"))
TRACED = [t for t in BENCH if t["traced_tactics"]]


# --- a Dojo double with lean_dojo's types and semantics --------------------------------------


@dataclass(frozen=True)
class TacticState:
    pp: str
    id: int = field(compare=False)
    message: Optional[str] = field(default=None, compare=False)


@dataclass(frozen=True)
class ProofFinished:
    tactic_state_id: int
    message: Optional[str] = field(default=None, compare=False)


@dataclass(frozen=True)
class ProofGivenUp:
    pass


@dataclass(frozen=True)
class LeanError:
    error: str


class DojoCrashError(Exception):
    @property
    def is_out_of_memory(self) -> bool:
        return str(self) == "OOM"


class DojoTacticTimeoutError(Exception):
    pass


class DojoInitError(Exception):
    pass


@dataclass(frozen=True)
class LeanGitRepo:
    url: str
    commit: str


@dataclass(frozen=True)
class DojoTheorem:
    repo: LeanGitRepo
    file_path: Path
    full_name: str


@dataclass(frozen=True)
class CommandState:
    id: int
    message: Optional[str] = field(default=None, compare=False)


class Behaviour:
    """Scripted faults shared by every Dojo the double creates (counts across restarts)."""

    def __init__(self) -> None:
        self.timeout_tactics: set[str] = set()
        self.oom_tactics: set[str] = set()
        self.entered = 0
        self.exited = 0
        self.proof_axioms = ["propext", "Classical.choice", "Quot.sound"]  # what the checked proof uses
        self.fail_enter_with_process: list[Any] = []  # (Popen, temp file) left by a failed __enter__
        self.fail_enter = False
        self.commands: list[str] = []
        self.sources: dict[str, str] = {}  # file_path -> text of the traced file

    def read_source(self, url: str, commit: str, file_path: str) -> Optional[str]:
        return self.sources.get(file_path)


def make_dojo_class(behaviour: Behaviour) -> type:
    class FakeDojo:
        def __init__(self, theorem: DojoTheorem, timeout: int = 600, additional_imports: list[str] = []) -> None:
            self.theorem, self.timeout = theorem, timeout
            self.broken = False
            self.next_id = 0

        def __enter__(self) -> tuple["FakeDojo", Any]:
            if behaviour.fail_enter:
                # Like LeanDojo: the modified file and the Lean process exist before the
                # first read fails, and `__exit__` is never called for a failed `__enter__`.
                import subprocess, sys, tempfile
                self.modified_file = tempfile.NamedTemporaryFile("wt", suffix=".lean", delete=False)
                self.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
                behaviour.fail_enter_with_process.append((self.proc, self.modified_file.name))
                raise DojoInitError("Unexpected EOF")
            if isinstance(self.theorem, tuple):  # command mode: the environment before the theorem
                repo, path, line = self.theorem
                self.record = next((t for t in BENCH if t["file_path"] == str(path) and t["start"][0] == line), None)
                if self.record is None:
                    raise DojoInitError(f"no theorem at {path}:{line}")
                self.declared: dict[str, list[str]] = {}
                behaviour.entered += 1
                return self, CommandState(0)
            rec = next((t for t in BENCH if t["full_name"] == self.theorem.full_name
                        and t["file_path"] == str(self.theorem.file_path)), None)
            if rec is None or not rec["traced_tactics"]:
                raise DojoInitError(f"Failed to locate the theorem with `{self.theorem.full_name}`")
            self.edges = {(tt["state_before"], tt["tactic"]): tt["state_after"] for tt in rec["traced_tactics"]}
            behaviour.entered += 1
            return self, self._state(rec["traced_tactics"][0]["state_before"])

        def __exit__(self, *exc: Any) -> None:
            behaviour.exited += 1

        def _state(self, pp: str) -> TacticState:
            self.next_id += 1
            return TacticState(pp, self.next_id - 1)

        def run_cmd(self, state: CommandState, command: str) -> Any:
            """A proof command is accepted when its tactics are the recorded proof; the
            declared constant then holds `behaviour.proof_axioms`. `#print axioms N` answers
            as Lean does for the declared constants."""
            import re
            behaviour.commands.append(command)
            if command.startswith("#print axioms "):
                n = command[len("#print axioms "):].strip()
                if n not in self.declared:
                    return LeanError(f"unknown constant '{n}'")
                axioms = sorted(self.declared[n])
                data = f"'{n}' depends on axioms: [{', '.join(axioms)}]" if axioms else f"'{n}' does not depend on any axioms"
                return CommandState(state.id + 1, data)
            m = re.search(r"theorem (\S+) .*?:= by\n(.*)", command, re.DOTALL)
            lines = [line.strip() for line in m.group(2).splitlines()] if m else []
            if lines != [tt["tactic"] for tt in self.record["traced_tactics"]]:
                return LeanError("unsolved goals")
            self.declared[m.group(1)] = list(behaviour.proof_axioms)
            return CommandState(state.id + 1, "")

        def run_tac(self, state: TacticState, tactic: str) -> Any:
            if self.broken:
                raise DojoCrashError("Unexpected EOF")
            if tactic in behaviour.timeout_tactics:
                self.broken = True
                raise DojoTacticTimeoutError()
            if tactic in behaviour.oom_tactics:
                self.broken = True
                raise DojoCrashError("OOM")
            if "sorry" in tactic:
                return ProofGivenUp()
            after = self.edges.get((state.pp, tactic))
            if after is None:
                return LeanError(f"unknown tactic `{tactic}`")
            if after == "no goals":
                return ProofFinished(self.next_id)
            return self._state(after)

    return FakeDojo


def fake_api(behaviour: Behaviour) -> DojoApi:
    def check_proof(theorem: DojoTheorem, proof: str) -> bool:
        rec = next(t for t in BENCH if t["full_name"] == theorem.full_name)
        lines = [line.strip() for line in proof.removeprefix("by\n").splitlines()]
        return lines == [tt["tactic"] for tt in rec["traced_tactics"]]

    return DojoApi(
        Dojo=make_dojo_class(behaviour), Theorem=DojoTheorem, LeanGitRepo=LeanGitRepo, TacticState=TacticState,
        ProofFinished=ProofFinished, LeanError=LeanError, ProofGivenUp=ProofGivenUp, DojoInitError=DojoInitError,
        DojoTacticTimeoutError=DojoTacticTimeoutError, DojoCrashError=DojoCrashError, check_proof=check_proof,
        CommandState=CommandState, read_source=behaviour.read_source,
    )


def linear(rec: dict) -> bool:
    """Each recorded step starts from the previous step's result (a straight-line proof)."""
    tts = rec["traced_tactics"]
    return all(a["state_after"] == b["state_before"] for a, b in zip(tts, tts[1:])) and tts[-1]["state_after"] == "no goals"


CHAINS = [t for t in TRACED if linear(t) and len(t["traced_tactics"]) >= 2]


def as_theorem(rec: dict, statement: str = "") -> Theorem:
    return Theorem(rec["full_name"], metadata={k: rec[k] for k in ("url", "commit", "file_path", "full_name", "start")},
                   statement=statement)


@pytest.fixture
def behaviour() -> Behaviour:
    return Behaviour()


@pytest.fixture
def env(behaviour) -> DojoEnvironment:
    with DojoEnvironment(api=fake_api(behaviour), timeout_s=60) as e:
        yield e


# --- tests ------------------------------------------------------------------------------------


def test_benchmark_has_straight_line_proofs():
    assert len(CHAINS) >= 3


def test_is_a_proof_environment(env):
    assert isinstance(env, ProofEnvironment)


def test_recorded_proofs_replay_to_proved(env):
    for rec in CHAINS[:5]:
        state = env.start(as_theorem(rec))
        assert state.pp == rec["traced_tactics"][0]["state_before"]
        for tt in rec["traced_tactics"][:-1]:
            result = env.apply(state, tt["tactic"])
            assert isinstance(result, Progress) and result.state.pp == tt["state_after"]
            state = result.state
        assert isinstance(env.apply(state, rec["traced_tactics"][-1]["tactic"]), Proved)


def test_errors_and_given_up_are_mapped(env):
    root = env.start(as_theorem(CHAINS[0]))
    err = env.apply(root, "exact definitely_not_a_lemma")
    assert isinstance(err, Failed) and err.kind == FailureKind.LEAN_ERROR and "unknown tactic" in err.message
    given_up = env.apply(root, "sorry")
    assert isinstance(given_up, Failed) and given_up.kind == FailureKind.GIVEN_UP


def test_timeout_restarts_the_dojo_and_stale_states_are_rebuilt(env, behaviour):
    rec = CHAINS[0]
    tts = rec["traced_tactics"]
    root = env.start(as_theorem(rec))
    first = env.apply(root, tts[0]["tactic"])
    behaviour.timeout_tactics.add("slow_tactic")
    timed_out = env.apply(first.state, "slow_tactic")
    assert isinstance(timed_out, Failed) and timed_out.kind == FailureKind.TIMEOUT
    assert behaviour.entered == 2 and behaviour.exited == 1 and env.restarts == 1
    # `first.state` lived in the broken Dojo: replayed in the new one, not sent to the broken one.
    assert first.state.handle.generation == 1
    again = env.apply(first.state, tts[1]["tactic"])
    expected = Proved if len(tts) == 2 else Progress
    assert isinstance(again, expected), again


def test_stale_state_without_rebuilding_is_a_crash(behaviour):
    with DojoEnvironment(api=fake_api(behaviour), rebuild_stale_states=False) as env:
        rec = CHAINS[0]
        root = env.start(as_theorem(rec))
        behaviour.timeout_tactics.add("slow_tactic")
        assert env.apply(root, "slow_tactic").kind == FailureKind.TIMEOUT
        stale = env.apply(root, rec["traced_tactics"][0]["tactic"])
        assert isinstance(stale, Failed) and stale.kind == FailureKind.CRASH and "stale" in stale.message


def test_out_of_memory_crash_is_named_and_restarts(env, behaviour):
    root = env.start(as_theorem(CHAINS[1]))
    behaviour.oom_tactics.add("nlinarith [big]")
    crash = env.apply(root, "nlinarith [big]")
    assert isinstance(crash, Failed) and crash.kind == FailureKind.CRASH and crash.message == "Lean ran out of memory"
    assert env.restarts == 1
    fresh = env.start(as_theorem(CHAINS[1]))
    assert isinstance(env.apply(fresh, CHAINS[1]["traced_tactics"][0]["tactic"]), (Progress, Proved))


def test_least_recently_used_dojo_is_closed_and_its_states_reopened(behaviour):
    with DojoEnvironment(api=fake_api(behaviour), max_open=1) as env:
        a = env.start(as_theorem(CHAINS[0]))
        env.start(as_theorem(CHAINS[1]))
        assert behaviour.exited == 1
        result = env.apply(a, CHAINS[0]["traced_tactics"][0]["tactic"])
        assert isinstance(result, (Progress, Proved)) and behaviour.entered == 3
    assert behaviour.exited == behaviour.entered


def test_start_errors_name_the_problem(env):
    with pytest.raises(EnvironmentStartError, match="needs metadata url, commit, file_path"):
        env.start(Theorem("x"))
    bad = dict(as_theorem(CHAINS[0]).metadata, full_name="Not.A.Theorem")
    with pytest.raises(EnvironmentStartError, match="Failed to locate"):
        env.start(Theorem("Not.A.Theorem", metadata=bad))
    root = env.start(as_theorem(CHAINS[0]))  # still usable after the failed starts
    assert root.pp == CHAINS[0]["traced_tactics"][0]["state_before"]


def test_verify_audits_axioms_of_a_fresh_constant(env, behaviour):
    rec = CHAINS[0]
    theorem = as_theorem(rec, statement=f"theorem {rec['full_name']} (p : Prop) (hp : p) : p := by")
    proof = [tt["tactic"] for tt in rec["traced_tactics"]]
    ok = env.verify(theorem, proof)
    assert ok.ok and "axioms: Classical.choice, Quot.sound, propext" in ok.message, ok
    command, audit = behaviour.commands[-2:]
    declared = command.split("theorem ")[1].split()[0]
    assert re.fullmatch(r"(\w+\.)*dco_verify_[0-9a-f]{32}", declared), declared
    assert audit == "#print axioms " + declared
    assert not env.verify(theorem, proof[:-1]).ok
    for bad in (["propext", "Lean.ofReduceBool"], ["sorryAx"], ["Lean.trustCompiler"]):
        behaviour.proof_axioms = bad
        v = env.verify(theorem, proof)
        assert not v.ok and "disallowed axioms" in v.message, v


def test_verify_screens_like_the_repl_and_never_verifies_unaudited(env):
    rec = CHAINS[0]
    theorem = as_theorem(rec, statement=f"theorem {rec['full_name']} : True := by")
    proof = [tt["tactic"] for tt in rec["traced_tactics"]]
    assert "rejected before Lean" in env.verify(theorem, ["exact h\n#eval 1"]).message
    assert "native" in env.verify(theorem, ["decide +native"]).message
    assert "native_decide" in env.verify(theorem, ["native_decide"]).message
    no_statement = env.verify(as_theorem(rec), proof)  # the old path: recompiled, "axioms not audited"
    assert not no_statement.ok and "audit" in no_statement.message and "not verified" in no_statement.message
    assert not env.verify(Theorem("x"), proof).ok


def test_verify_reads_the_statement_from_the_traced_file(env, behaviour):
    rec = CHAINS[0]
    line = rec["start"][0]
    lines = ["import Mathlib", "namespace Demo"] + ["-- filler"] * (line - 4) + [
        "/-- doc -/", f"@[simp, to_additive \"x := y\"] theorem {rec['full_name']} (n : ℕ) :", "    n = n := by", "  rfl"]
    behaviour.sources[rec["file_path"]] = "\n".join(lines)
    v = env.verify(as_theorem(rec), [tt["tactic"] for tt in rec["traced_tactics"]])
    assert v.ok, v
    command = behaviour.commands[-2]
    assert "(n : ℕ) :\n    n = n := by\n" in command and "to_additive" not in command


def test_apply_screens_and_sends_the_screened_text(env):
    root = env.start(as_theorem(CHAINS[0]))
    bad = env.apply(root, "native_decide")
    assert isinstance(bad, Failed) and bad.kind == FailureKind.LEAN_ERROR and "native_decide" in bad.message
    first = CHAINS[0]["traced_tactics"][0]["tactic"]
    assert isinstance(env.apply(root, first + " -- a comment"), (Progress, Proved))  # comment blanked before sending


def test_failed_dojo_enter_leaves_no_process_or_temp_file(env, behaviour):
    behaviour.fail_enter = True
    with pytest.raises(EnvironmentStartError, match="Unexpected EOF"):
        env.start(as_theorem(CHAINS[0]))
    v = env.verify(as_theorem(CHAINS[0], statement="theorem t : True := by"), ["trivial"])
    assert not v.ok and "could not open" in v.message
    assert len(behaviour.fail_enter_with_process) == 2
    for proc, path in behaviour.fail_enter_with_process:
        assert proc.wait(timeout=5) is not None
        assert not os.path.exists(path)


@pytest.mark.skipif(importlib.util.find_spec("lean_dojo") is not None, reason="lean_dojo is installed here")
def test_missing_lean_dojo_gives_an_install_hint(monkeypatch):
    monkeypatch.delenv("DISABLE_REMOTE_CACHE", raising=False)
    with pytest.raises(LeanDojoUnavailable, match=r"pip install -e '\.\[lean\]'"):
        load_lean_dojo()
    assert os.environ.get("DISABLE_REMOTE_CACHE") == "1"  # set before the import is attempted


@pytest.mark.lean
def test_real_lean_dojo_api_loads():
    pytest.importorskip("lean_dojo", reason="lean_dojo is not installed (pip install -e '.[lean]')")
    api = load_lean_dojo()
    assert api.Dojo.__name__ == "Dojo" and os.environ.get("DISABLE_REMOTE_CACHE")
