"""Screening of untrusted statements, headers and tactics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from prover.lean.untrusted import (
    UntrustedInputError,
    check_header,
    check_statement,
    check_tactic,
    parse_header,
    split_statement,
)

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = [json.loads(line) for line in (ROOT / "tests/data/hostile_statements/hostile.jsonl").read_text(encoding="utf-8").split("\n") if line.strip()]
MINIF2F = [json.loads(line) for line in (ROOT / "prover/resources/minif2f/minif2f.jsonl").read_text(encoding="utf-8").split("\n") if line.strip()]
ACCEPTED = [json.loads(line) for line in (ROOT / "tests/data/hostile_statements/accepted.jsonl").read_text(encoding="utf-8").split("\n") if line.strip()]
CHECK = {"statement": check_statement, "header": check_header, "tactic": check_tactic}


def test_hostile_corpus_is_large_and_varied():
    assert len(HOSTILE) + len(ACCEPTED) >= 150 and len(ACCEPTED) >= 40
    assert sum(a["source"].startswith("miniF2F") and a["kind"] == "statement" for a in ACCEPTED) >= 20
    assert len({h["id"] for h in HOSTILE + ACCEPTED}) == len(HOSTILE) + len(ACCEPTED)
    assert {a["kind"] for a in ACCEPTED} == {"statement", "header", "tactic"}
    assert len({h["id"] for h in HOSTILE}) == len(HOSTILE)
    assert {h["kind"] for h in HOSTILE} == {"statement", "header", "tactic"}
    assert sum(h["kind"] == "statement" for h in HOSTILE) >= 40


@pytest.mark.parametrize("case", HOSTILE, ids=[h["id"] for h in HOSTILE])
def test_every_hostile_input_is_rejected_naming_what_was_found(case):
    with pytest.raises(UntrustedInputError) as info:
        CHECK[case["kind"]](case["text"])
    assert case["reason"] in str(info.value)
    # Every rejection names its rule, and the position where there is one.
    assert info.value.rule and f"rule `{info.value.rule}`" in str(info.value)
    if info.value.position is not None:
        assert re.fullmatch(r"\d+:\d+", info.value.position) and f" at {info.value.position}:" in str(info.value)


@pytest.mark.parametrize("case", ACCEPTED, ids=[a["id"] for a in ACCEPTED])
def test_every_accepted_input_passes(case):
    checked = CHECK[case["kind"]](case["text"])
    assert checked.text.strip()


def test_positions_are_line_and_column():
    with pytest.raises(UntrustedInputError) as info:
        check_statement("theorem t (n : ℕ)\n    (h : (by native_decide : 1 < 2)) : True := by")
    assert info.value.rule == "forbidden-word" and info.value.position == "2:13"


def test_all_minif2f_statements_and_their_header_are_accepted():
    assert len(MINIF2F) == 488
    for row in MINIF2F:
        checked = check_statement(row["formal_statement"])
        assert checked.kind == "theorem" and checked.name == row["name"]
        assert not checked.text.rstrip().endswith(":= by")
        assert checked.text == row["formal_statement"].rstrip()[: -len(":= by")].rstrip()
    header = check_header(MINIF2F[0]["header"])
    assert header.imports == ("Mathlib", "Aesop")
    # "unlimited" is lowered to the cap (named in `adjusted`); everything else is kept.
    assert header.body == "set_option maxHeartbeats 10000000\n\nopen BigOperators Real Nat Topology Rat"
    assert header.adjusted and "lowered to 10000000" in header.adjusted[0]


@pytest.mark.parametrize(
    "text",
    [
        "theorem t : True := by sorry",
        "theorem t : True := sorry",
        "theorem t : True :=",
        "theorem t : True",
        "lemma t (a b : ℕ) (h₀ : a ≤ b) : a + 0 ≤ b := by",
        "example : (2 : ℤ) ∣ 4 := by",
        "open Real Nat in\ntheorem t : Real.pi > 3 := by",
        "namespace Foo\nvariable (x : ℕ)\nuniverse u\nopen scoped BigOperators\ntheorem t : x = x := by",
        "set_option maxHeartbeats 400000 in\ntheorem t : True := by",
        "noncomputable section\ntheorem t : True := by",
        "private theorem t : True := by",
        "/-- A doc comment with #eval and run_cmd inside. -/\ntheorem t : True := by -- trailing comment",
        "theorem t (f : ℕ → ℕ) (h : ∀ x, f x = let y := x; y) : f 1 = 1 := by",
        "theorem t (s : Set ℕ) (f : ℕ → ℕ) : f '' s ⊆ Set.univ ∧ f ⁻¹' {0} ⊆ Set.univ := by",
        "theorem t : (by exact 1 : ℕ) = 1 := by",
        "theorem t : True := by\r\n  sorry",
    ],
)
def test_benign_statements_are_accepted(text):
    check_statement(text)


def test_comments_are_blanked_in_what_is_sent_to_lean():
    checked = check_statement("/- hidden -/ theorem t : True := by -- note")
    assert checked.text == " " * len("/- hidden -/") + " theorem t : True"
    assert checked.preamble == "" and checked.declaration == "theorem t : True"


def test_statement_split_gives_name_kind_and_preamble():
    c = check_statement("open Real\nnamespace A\ntheorem B.c (x : ℝ) : x = x := by sorry")
    assert (c.kind, c.name, c.preamble, c.declaration) == ("theorem", "B.c", "open Real\nnamespace A", "theorem B.c (x : ℝ) : x = x")
    e = split_statement("example : True := by")
    assert e.kind == "example" and e.name is None and e.text[e.keyword_start:].startswith("example")


def test_limits_and_types():
    with pytest.raises(UntrustedInputError, match="limit"):
        check_statement("theorem t : True := by\n" + "-" * 30_000)
    with pytest.raises(UntrustedInputError, match="empty"):
        check_statement("   ")
    with pytest.raises(UntrustedInputError, match="must be a string"):
        check_statement(b"theorem t : True")  # type: ignore[arg-type]


def test_header_allow_list_is_configurable():
    assert check_header("").imports == ()
    assert check_header("import Mathlib.Tactic\nimport Batteries.Data.List").imports == ("Mathlib.Tactic", "Batteries.Data.List")
    with pytest.raises(UntrustedInputError, match="`Lean`"):
        check_header("import Lean")
    assert check_header("import Lean", allowed_import_roots=("Lean",)).imports == ("Lean",)
    with pytest.raises(UntrustedInputError, match="`MathlibEvil`"):
        check_header("import MathlibEvil")
    assert parse_header("-- c\nimport B\nimport A\nopen X").imports == ("B", "A")


@pytest.mark.parametrize(
    "tactic",
    ["simp", "nlinarith [sq_nonneg (a - b), sq_nonneg (a + b)]", "induction x with\n| zero => rfl\n| succ n ih => simp",
     "open Real in simp", "set_option maxRecDepth 2000 in norm_num", "exact?", "rw [h₀] at h₁ ⊢", "sorry",
     "obtain ⟨x, hx⟩ := h", "have h : x = 1 := by\n    omega", "field_simp [f '' s]", "decide"],
)
def test_benign_tactics_are_accepted(tactic):
    assert check_tactic(tactic).text == tactic
