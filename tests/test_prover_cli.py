"""`dco-prover prove` end to end through the Typer app, and the runner API it uses."""

from __future__ import annotations

import json
import threading

import pytest
from typer.testing import CliRunner

from prover.cli import app
from prover.replay import ReplayEnvironment
from prover.runner import (
    EnvironmentUnavailable,
    GeneratorSpec,
    ProveSettings,
    lean_problems,
    make_environment,
    make_generators,
    prove,
)
from prover.theorems import find_theorem, load_leandojo
from search.budget import Budget
from search.result import Status

runner = CliRunner()


def _prove(*args: str):
    return runner.invoke(app, ["prove", *args])


# ------------------------------------------------------------------------------- CLI


def test_prove_with_oracle_prints_the_proof() -> None:
    result = _prove("--name", "Convex.thickening", "--generator", "oracle")
    assert result.exit_code == 0, result.output
    assert "Convex.thickening" in result.output and "proved" in result.output
    assert "rw [← add_ball_zero]" in result.output and "exact hs.add (convex_ball 0 _)" in result.output


def test_prove_json_record_parses() -> None:
    result = _prove("--name", "CategoryTheory.Equivalence.invFunIdAssoc_hom_app", "--generator", "oracle", "--strategy", "sampling",
                    "--max-passes", "200", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["status"] == "proved" and record["verified"] is True
    assert record["proof"] == ["dsimp [invFunIdAssoc]", "aesop_cat"]
    assert record["strategy"] == "sampling" and 1 <= record["passes"] <= 200
    assert record["settings"]["env"] == "replay" and record["settings"]["generator"]["kind"] == "oracle"
    assert record["settings"]["budget"]["max_passes"] == 200


def test_fixed_list_is_the_default_generator(tmp_path) -> None:
    # No replayable proof of the bundled sample is a single tactic of the default list (its
    # `simp` proofs share a line with their statement: not replayable), so a one-theorem
    # LeanDojo file laid out as `theorem … := by` / `  simp` stands in.
    record = {"url": "u", "commit": "c", "file_path": "F.lean", "full_name": "T.add_zero", "start": [1, 1], "end": [2, 7],
              "traced_tactics": [{"tactic": "simp", "annotated_tactic": ["simp", []],
                                  "state_before": "x : ℕ\n⊢ x + 0 = x", "state_after": "no goals"}]}
    (tmp_path / "one.json").write_text(json.dumps([record]))
    proved = _prove("--name", "T.add_zero", "--benchmark", str(tmp_path / "one.json"), "--json")
    assert proved.exit_code == 0, proved.output
    record = json.loads(proved.stdout)
    assert record["proof"] == ["simp"] and record["member"] == "fixed"
    unproved = _prove("--name", "Fin.zero_add", "--json", "--max-expansions", "5")
    assert unproved.exit_code == 1
    assert json.loads(unproved.stdout)["status"] in ("failed", "budget_exhausted")


def test_unknown_theorem_is_a_clear_error() -> None:
    result = _prove("--name", "Fin.zero_ad")
    assert result.exit_code == 2
    assert "unknown theorem 'Fin.zero_ad'" in result.output and "Fin.zero_add" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--name", "antisymm_iff", "--max-depth", "0"], "max_depth must be a positive integer"),
        (["--name", "antisymm_iff", "--time-limit", "-1"], "time_limit_s must be a positive number"),
        (["--name", "antisymm_iff", "--models", "/nonexistent/ckpt"], "does not exist"),
        (["--name", "antisymm_iff", "--generator", "model"], "needs --models or --ensemble"),
        (["--name", "antisymm_iff", "--generator", "oracle", "--models", "tiny-qwen2"], "need the model generator"),
        (["--statement", "theorem t : True", "--name", "antisymm_iff"], "not both"),
        (["--statement", "theorem t : True", "--env", "replay"], "cannot be opened by the replay environment"),
        (["--statement", "def x := 1"], "theorem"),
        ([], "give the theorem"),
        (["--name", "antisymm_iff", "--env", "repl"], "has no statement text"),
        (["--name", "amc12a_2015_p10", "--benchmark", "minif2f", "--generator", "oracle"], "oracle generator only works with the replay"),
    ],
)
def test_bad_input_exits_2_with_a_message(args: list[str], message: str) -> None:
    result = _prove(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_bad_choice_is_rejected_by_the_parser() -> None:
    result = _prove("--name", "antisymm_iff", "--strategy", "dfs")
    assert result.exit_code == 2 and "dfs" in result.output


@pytest.mark.skipif(not lean_problems(), reason="Lean is installed here: the missing-Lean message cannot be shown")
def test_missing_lean_points_to_setup() -> None:
    result = _prove("--statement", "theorem t (n : Nat) : n + 0 = n")
    assert result.exit_code == 2
    assert "dco-prover setup-lean" in result.output and "dco-prover doctor" in result.output
    with pytest.raises(EnvironmentUnavailable, match="setup-lean"):
        make_environment("repl")


# ---------------------------------------------------------------------------- runner


def test_settings_validate_and_round_trip() -> None:
    settings = ProveSettings(strategy="sampling", budget=Budget(max_passes=7), ensemble_mode="mixture",
                             generator=GeneratorSpec(kind="model", models=("a", "b")), forbidden_tactics=("sorry",))
    assert ProveSettings.from_json(json.loads(json.dumps(settings.to_json()))) == settings
    for bad in ({"strategy": "dfs"}, {"ensemble_mode": "vote"}, {"env": "lean3"}, {"length_alpha": -1},
                {"samples_per_step": 0}, {"env": "repl", "generator": GeneratorSpec(kind="oracle")}):
        with pytest.raises(ValueError):
            ProveSettings(**bad)
    with pytest.raises(ValueError):
        GeneratorSpec(kind="model")
    with pytest.raises(ValueError):
        make_environment("lean3")  # type: ignore[arg-type]


def test_prove_ensembles_share_one_cache_and_honour_cancel() -> None:
    replay = ReplayEnvironment.from_benchmark()
    theorem = find_theorem(load_leandojo(), "Mon_.mul_rightUnitor")
    oracle = make_generators(GeneratorSpec(kind="oracle"), env=replay)["oracle"]
    other = make_generators(GeneratorSpec(kind="oracle", oracle_seed=5), env=replay)["oracle"]
    members = {"a": oracle, "b": other}
    for mode in ("union", "mixture"):
        result = prove(theorem, replay, members, ProveSettings(ensemble_mode=mode, budget=Budget(max_expansions=50)))
        assert result.proved and result.member in members
        assert result.cache_hits + result.cache_misses == result.lean_calls
    union = prove(theorem, replay, members, ProveSettings(budget=Budget(max_expansions=50)))
    assert union.members["b"].cache_hits > 0  # b re-applies what a already ran
    events: list[dict] = []
    cancel = threading.Event()
    cancel.set()
    cancelled = prove(theorem, replay, oracle, ProveSettings(), progress=events.append, cancel=cancel)
    assert cancelled.status is Status.CANCELLED and not cancelled.proved
    fixed = make_generators(GeneratorSpec(kind="fixed", fixed_tactics=("simp", "rfl")))
    assert [c.tactic for c in fixed["fixed"].candidates] == ["simp", "rfl"]
    with pytest.raises(ValueError, match="replay"):
        make_generators(GeneratorSpec(kind="oracle"), env=None)
