"""The shared tactic filter and the candidate normaliser."""

from __future__ import annotations

import math

import pytest

from search.tactic_filter import (
    DEFAULT_FORBIDDEN,
    TacticFilter,
    normalize_candidates,
    normalize_pairs,
    prepare_candidates,
)
from search.types import Candidate


@pytest.mark.parametrize(
    "tactic",
    [
        "sorry",
        "exact sorry",
        "  sorry  ",
        "refine ⟨sorry, ?_⟩",
        "(admit)",
        "admit",
        "native_decide",
        "simp; native_decide",
        "exact foo\n  sorry",
        "first | rfl | sorry",
        "exact (sorry : False)",
        "stop",
        "constructor\n  stop\n  simp",
        "exact sorryAx _ false",
        "decide +native",
        "decide (config := {native := true})",
        "decide (config := .native)",
        "exact Lean.ofReduceBool _ _ rfl",
        "exact ofReduceBool _ _ rfl",
        "exact Lean.trustCompiler",
        "plausible",
        "bv_decide",
    ],
)
def test_forbidden_identifiers_are_rejected(tactic: str) -> None:
    f = TacticFilter()
    assert not f.allows(tactic)
    reason = f.reason(tactic)
    assert reason is not None and "forbidden identifier" in reason


@pytest.mark.parametrize(
    "tactic",
    [
        "exact sorry_lemma",
        "apply my_admit'",
        "exact Foo.sorry",
        "exact admitted",
        "decide",
        "exact sorry₁",
        "simp [native_decide_lemma]",
        "exact unsorry",
        "rfl",
        "exact stop_lemma",
        "exact Foo.native",
        "exact h.stop",
    ],
)
def test_longer_identifiers_are_allowed(tactic: str) -> None:
    f = TacticFilter()
    assert f.allows(tactic)
    assert f.reason(tactic) is None


def test_reason_names_the_identifier_and_configurable_list() -> None:
    f = TacticFilter(forbidden=("omega", "Classical.choice"))
    assert f.reason("simp; omega") == "forbidden identifier 'omega'"
    assert f.allows("sorry")  # not in this list
    assert not f.allows("exact Classical.choice h")
    assert f.allows("exact MyClassical.choice h")
    assert TacticFilter(forbidden=()).allows("sorry")
    assert TacticFilter().forbidden == DEFAULT_FORBIDDEN


@pytest.mark.parametrize("bad", [("",), ("exact sorry",), ("a-b",), (3,)])
def test_bad_forbidden_entries_raise(bad) -> None:
    with pytest.raises(ValueError, match="Lean identifier"):
        TacticFilter(forbidden=bad)


def test_a_single_string_is_refused() -> None:
    with pytest.raises(TypeError):
        TacticFilter(forbidden="sorry")


def test_normalize_strips_dedups_keeps_max_and_sorts() -> None:
    prepared = normalize_candidates(
        [
            Candidate(" simp ", -2.0),
            Candidate("rfl", -1.0),
            Candidate("simp", -0.5),
            Candidate("   ", -0.1),
            Candidate("", -0.1),
            Candidate("ring", -1.0),
            Candidate("rfl", -3.0),
        ]
    )
    assert [(c.tactic, c.logprob) for c in prepared.candidates] == [("simp", -0.5), ("rfl", -1.0), ("ring", -1.0)]
    assert prepared.dropped == {"empty": 2, "duplicate": 2}


def test_normalize_counts_invalid_items() -> None:
    pairs, dropped, example = normalize_pairs(
        [Candidate("a", math.nan), Candidate("b", 0.5), ("c", -1.0), Candidate("d", 1e-9), Candidate("e", -math.inf)]
    )
    assert pairs == [("d", 0.0), ("e", -math.inf)]  # a tiny positive rounding error is clamped
    assert dropped == {"invalid": 3}
    assert example is not None and "nan" in example


def test_prepare_filters_forbidden_and_counts() -> None:
    prepared = prepare_candidates(
        [Candidate("sorry", -0.1), Candidate("exact sorry", -0.2), Candidate("rfl", -0.3)], TacticFilter()
    )
    assert [c.tactic for c in prepared.candidates] == ["rfl"]
    assert prepared.dropped == {"forbidden": 2}
