"""End-to-end checks against a real Lean REPL (skipped unless `lake` and the built REPL exist).

Run `dco-prover setup-lean` first; these use `lean_project/` as set up there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil
import pytest

from prover.lean.paths import repl_binary
from prover.lean.process import ReplConfig
from prover.lean.repl_env import ReplEnvironment
from search.types import Failed, FailureKind, Progress, Proved, Theorem

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.lean,
    pytest.mark.skipif(not repl_binary().exists(), reason=f"the REPL is not built ({repl_binary()}): run `dco-prover setup-lean`"),
]


@pytest.fixture(scope="module")
def env():
    with ReplEnvironment(ReplConfig(header_timeout_s=900), max_processes=1) as e:
        yield e


def test_core_theorem_start_apply_verify(env):
    theorem = Theorem("dco_core", "theorem dco_core (p q : Prop) (hp : p) (hq : q) : p ∧ q := by")
    root = env.start(theorem)
    assert root.pp == "p q : Prop\nhp : p\nhq : q\n⊢ p ∧ q"
    split = env.apply(root, "constructor")
    assert isinstance(split, Progress) and split.state.pp.count("⊢") == 2
    assert isinstance(env.apply(root, "exact ⟨hp, hq⟩"), Proved)
    bad = env.apply(root, "exact hp")
    assert isinstance(bad, Failed) and bad.kind == FailureKind.LEAN_ERROR
    assert env.verify(theorem, ["exact ⟨hp, hq⟩"]).ok
    assert not env.verify(theorem, ["exact hp"]).ok


def test_minif2f_statement_with_mathlib_header(env):
    row = json.loads((ROOT / "prover/resources/minif2f/minif2f.jsonl").read_text(encoding="utf-8").splitlines()[0])
    root = env.start(Theorem(row["name"], row["formal_statement"], row["header"]))
    assert "⊢" in root.pp and "h₀" in root.pp


def test_timeout_leaves_no_process_behind(env):
    root = env.start(Theorem("dco_slow", "theorem dco_slow : True := by"))
    proc = env.pool.processes()[0]
    pid = proc.pid
    result = env.apply(root, "sleep 20000", timeout_s=2)
    assert isinstance(result, Failed) and result.kind == FailureKind.TIMEOUT
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    leftovers = [p for p in psutil.process_iter() if _pgid(p.pid) == pid]
    assert leftovers == []
    assert isinstance(env.apply(root, "trivial"), Proved)  # rebuilt in a fresh process


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
