"""Theorem sources: LeanDojo JSON, miniF2F JSONL, typed statements, lookup errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prover.theorems import (
    TheoremNotFoundError,
    TheoremSourceError,
    declaration_name,
    find_theorem,
    load_leandojo,
    load_minif2f,
    load_theorems,
    strip_proof_stub,
    theorem_from_statement,
)


def test_leandojo_sample_theorems_carry_coordinates() -> None:
    theorems = load_leandojo()
    assert len(theorems) == 108 and len({t.id for t in theorems}) == 108
    first = theorems[0]
    assert first.id == "ContinuousAt.comp_lowerSemicontinuousWithinAt_antitone"
    assert first.metadata["url"] == "https://github.com/leanprover-community/mathlib4"
    assert first.metadata["commit"] == "29dcec074de168ac2bf835a77ef68bbe069194c5"
    assert first.metadata["file_path"] == "Mathlib/Topology/Semicontinuous.lean"
    assert first.metadata["traced_tactics"] == 0
    assert sum(t.metadata["traced_tactics"] > 0 for t in theorems) == 55


def test_minif2f_statements_end_at_their_colon_equals() -> None:
    theorems = load_minif2f()
    assert theorems and all(t.statement.endswith(":=") and not t.statement.endswith("by :=") for t in theorems)
    assert all(t.header.startswith("import") for t in theorems)
    by_id = {t.id: t for t in theorems}
    t = by_id["amc12a_2015_p10"]
    assert t.statement == "theorem amc12a_2015_p10 (x y : ℤ) (h₀ : 0 < y) (h₁ : y < x) (h₂ : x + y + x * y = 80) : x = 26 :="
    splits = {t.metadata["split"] for t in theorems}
    assert splits <= {"valid", "test"}
    assert all(t.metadata["split"] == "test" for t in load_minif2f(split="test"))
    assert load_theorems("minif2f") == theorems


def test_statement_normalisation() -> None:
    for text in ("theorem t (n : Nat) : n + 0 = n", "theorem t (n : Nat) : n + 0 = n := by",
                 "theorem t (n : Nat) : n + 0 = n :=\n  by sorry", "  theorem t (n : Nat) : n + 0 = n := sorry  "):
        assert strip_proof_stub(text) == "theorem t (n : Nat) : n + 0 = n :="
    theorem = theorem_from_statement("lemma foo.bar {α} (a : α) : a = a := by", header="import Mathlib")
    assert (theorem.id, theorem.header) == ("foo.bar", "import Mathlib")
    assert declaration_name("/-- doc -/ @[simp] private theorem q : True") == "q"
    assert declaration_name("example : 1 = 1") == "example"
    with pytest.raises(ValueError, match="theorem"):
        theorem_from_statement("def x := 1")
    with pytest.raises(ValueError):
        theorem_from_statement("   ")


def test_unknown_theorem_lists_close_matches() -> None:
    theorems = load_leandojo()
    assert find_theorem(theorems, "Fin.zero_add").id == "Fin.zero_add"
    with pytest.raises(TheoremNotFoundError) as err:
        find_theorem(theorems, "Fin.zero_ad")
    assert "unknown theorem 'Fin.zero_ad'" in str(err.value) and "Fin.zero_add" in str(err.value)
    with pytest.raises(TheoremNotFoundError, match="did you mean: .*Nat.fib_dvd"):
        find_theorem(None, "fib_dvd")  # the bundled sample; unqualified names are suggested
    with pytest.raises(TheoremNotFoundError, match="did you mean"):
        find_theorem("minif2f", "amc12a_2015_p1")


def test_bad_files_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(TheoremSourceError, match="does not exist"):
        load_leandojo(tmp_path / "nope.json")
    with pytest.raises(TheoremSourceError, match="does not exist"):
        load_minif2f(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"name": "x", "formal_statement": "theorem x : True := by"}) + "\n{not json\n")
    with pytest.raises(TheoremSourceError, match=r"bad.jsonl:2"):
        load_minif2f(bad)
    missing = tmp_path / "missing_field.jsonl"
    missing.write_text(json.dumps({"name": "x"}) + "\n")
    with pytest.raises(TheoremSourceError, match="missing_field.jsonl:1"):
        load_minif2f(missing)
