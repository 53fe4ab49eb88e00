"""Expert iteration on the bundled LeanDojo sample through the replay environment.

The search stage uses the oracle generator (`search_generator="oracle"`, a replay-data
"model" with real sampling semantics) so that iteration 1 proves held-out theorems
deterministically; training and the evaluation stage use the real tiny-qwen2 ensemble.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prover.expert_iteration import ExpertRunError, load_expert_config, run_expert_iteration
from prover.expert_iteration import dataset as ds
from prover.expert_iteration.runner import _check_config
from prover.replay import ReplayEnvironment
from search.types import ProofState, Theorem

torch.set_num_threads(1)


class Killed(Exception):
    """Stands in for the process being killed in the middle of a training run."""


def _config(**extra):
    return load_expert_config(
        None, iterations=2, n_effs=[1, 2], holdout_fraction=0.3, holdout_seed=0, retrain_from="previous",
        search_generator="oracle",
        train_overrides=dict(max_steps=3, epochs=1, save_every_steps=1, eval_fraction=0.0, progress=False,
                             batch_size=4, micro_batch_size=4),
        search=dict(strategy="best_first", max_expansions=20, tactics_per_expansion=8, time_limit_s=60),
        eval=dict(strategy="best_first", max_expansions=1, tactics_per_expansion=2, max_new_tokens=8, limit=4,
                  time_limit_s=60),
        **extra,
    )


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_two_iterations_kill_during_retraining_and_resume(tmp_path, monkeypatch):
    from prover.eval import runner as eval_runner
    from training.data import load_tactic_examples

    run_dir = tmp_path / "run"
    config = _config()
    eval_calls: list[Path] = []
    real_run_eval = eval_runner.run_eval

    def counting_run_eval(cfg, rdir, **kwargs):
        eval_calls.append(Path(rdir))
        return real_run_eval(cfg, rdir, **kwargs)

    monkeypatch.setattr(eval_runner, "run_eval", counting_run_eval)

    def kill(iteration, n_eff, record):
        if iteration == 1 and n_eff == 2 and record["step"] == 2:
            raise Killed

    with pytest.raises(Killed):
        run_expert_iteration(config, run_dir, on_train_step=kill)

    search_run = run_dir / "iter-1" / "search" / "run"
    assert json.loads((run_dir / "iter-1" / "search" / "manifest.json").read_text())["status"] == "completed"
    assert json.loads((run_dir / "iter-1" / "train" / "manifest.json").read_text())["status"] == "running"
    assert search_run in eval_calls
    results_before = (search_run / "results.jsonl").read_bytes()
    results_mtime = (search_run / "results.jsonl").stat().st_mtime_ns
    neff1_result = run_dir / "iter-1" / "train" / "neff-1" / "train_result.json"
    neff1_mtime = neff1_result.stat().st_mtime_ns  # member 1 finished before the kill
    assert any((run_dir / "iter-1" / "train" / "neff-2" / "checkpoints").iterdir()), "a resumable checkpoint was left"
    events_before = len(_lines(run_dir / "events.jsonl"))

    eval_calls.clear()
    outcome = run_expert_iteration(config, run_dir)

    # The search of iteration 1 was not redone; its results are untouched.
    assert search_run not in eval_calls
    assert (search_run / "results.jsonl").read_bytes() == results_before
    assert (search_run / "results.jsonl").stat().st_mtime_ns == results_mtime
    resumed = _lines(run_dir / "events.jsonl")[events_before:]
    assert {"iteration": 1, "stage": "search", "event": "skipped"} in [
        {k: e[k] for k in ("iteration", "stage", "event")} for e in resumed]
    assert not [e for e in resumed if e["event"] == "started" and (e["iteration"], e["stage"]) in
                {(0, "data"), (0, "train"), (0, "eval"), (1, "search"), (1, "data")}]
    train_manifest = json.loads((run_dir / "iter-1" / "train" / "manifest.json").read_text())
    assert train_manifest["status"] == "completed" and train_manifest["attempt"] == 2
    assert train_manifest["counts"]["steps"] == {"neff-1": 3, "neff-2": 3}
    assert neff1_result.stat().st_mtime_ns == neff1_mtime  # the finished member was not retrained
    # retrain_from=previous: iteration 1 starts from iteration 0's checkpoints.
    neff2_config = (run_dir / "iter-1" / "train" / "neff-2" / "config.yaml").read_text()
    assert str(run_dir.resolve() / "iter-0" / "train" / "neff-2" / "final") in neff2_config

    # The default evaluation set is the fixed held-out split: the same at every iteration and
    # disjoint from every theorem whose proof any iteration trained on (or harvested).
    eval_ids = {t["full_name"] for t in ds.read_raw(run_dir / "iter-0" / "data" / "eval.json")}
    assert eval_ids
    for it in (0, 1, 2):
        trained = {t["full_name"] for t in ds.read_raw(run_dir / f"iter-{it}" / "data" / "train.json") if t["traced_tactics"]}
        assert not eval_ids & trained
        eval_manifest = json.loads((run_dir / f"iter-{it}" / "eval" / "manifest.json").read_text())
        assert eval_manifest["inputs"]["benchmark"].endswith("iter-0/data/eval.json")
        assert eval_manifest["counts"]["overlap_with_training"] == 0
    assert not eval_ids & {t["full_name"] for t in ds.read_raw(run_dir / "iter-0" / "data" / "unproved.json")}
    assert "the same theorems at every iteration" in (run_dir / "summary.md").read_text()

    # Held-out proofs are absent from iteration 0's training data.
    held_out = {t["full_name"] for t in ds.read_raw(run_dir / "iter-0" / "data" / "unproved.json")}
    base_train = ds.read_raw(run_dir / "iter-0" / "data" / "train.json")
    assert held_out and not held_out & {t["full_name"] for t in base_train}

    # Iteration 1's new pairs are exactly the replayed steps of the verified proofs.
    env = ReplayEnvironment.from_benchmark()
    expected: list[tuple] = []
    for record in _lines(search_run / "results.jsonl"):
        if record["member"] == "ensemble" or not record["proved"]:
            continue
        assert record["result"]["verified"]
        state = env.start(Theorem(record["theorem_id"])).pp
        for step, tactic in enumerate(record["result"]["proof"]):
            outcome_step = env.apply(ProofState(pp=state), tactic)
            after = "no goals" if type(outcome_step).__name__ == "Proved" else outcome_step.state.pp
            expected.append((1, record["member"], record["theorem_id"], step, state, tactic, after))
            state = after
        assert state == "no goals"
    new_pairs = ds.read_pairs(run_dir / "iter-1" / "data" / "new_pairs.jsonl")
    assert expected and [tuple(vars(p).values()) for p in new_pairs] == expected
    assert {p.theorem for p in new_pairs} <= held_out

    data_manifest = json.loads((run_dir / "iter-1" / "data" / "manifest.json").read_text())
    counts = data_manifest["counts"]
    assert counts["pairs_added"] == len(new_pairs) and counts["duplicates_skipped"] == 0
    assert counts["pairs_added_per_member"] == {"oracle": len(new_pairs)}
    assert sorted(counts["proved_ids"]) == sorted({p.theorem for p in new_pairs})
    assert counts["unproved_after"] == counts["unproved_before"] - counts["proved"]
    # The trainer sees the old examples plus exactly the new pairs.
    _, base_stats = load_tactic_examples(run_dir / "iter-0" / "data" / "train.json")
    _, merged_stats = load_tactic_examples(run_dir / "iter-1" / "data" / "train.json")
    assert merged_stats.examples == base_stats.examples + len(new_pairs)
    merged = ds.read_raw(run_dir / "iter-1" / "data" / "train.json")
    assert merged[: len(base_train)] == base_train
    assert all(t["traced_tactics"][0]["provenance"]["iteration"] == 1 for t in merged[len(base_train):])

    # Iteration 2 searched only what iteration 1 left unproved; the summary covers 0..2.
    search2 = json.loads((run_dir / "iter-2" / "search" / "manifest.json").read_text())
    assert search2["counts"]["searched"] == counts["unproved_after"]
    rows = outcome.summary["iterations"]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert rows[1]["proved"] == counts["proved"] and rows[2]["proved_total"] == counts["proved"] + rows[2]["proved"]
    assert set(rows[2]["eval"]) == {"neff-1", "neff-2", "ensemble"}
    assert "| 1 |" in (run_dir / "summary.md").read_text()
    assert (run_dir / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((run_dir / "iter-2" / "manifest.json").read_text())["status"] == "completed"


def test_resume_with_different_settings_is_refused(tmp_path):
    _check_config(tmp_path, _config())
    _check_config(tmp_path, _config(workers=2))  # distribution settings may change
    with pytest.raises(ExpertRunError, match="holdout_fraction"):
        _check_config(tmp_path, load_expert_config(None, holdout_fraction=0.4))


def _pair(theorem, step, before, tactic, after, member="m"):
    return ds.Pair(1, member, theorem, step, before, tactic, after)


def test_merge_skips_and_counts_duplicates():
    dataset = [{"full_name": "old", "file_path": "f", "url": "u", "commit": "c", "start": [1, 1], "end": [2, 1],
                "traced_tactics": [{"tactic": "simp", "annotated_tactic": ["<a>simp</a>", []],
                                    "state_before": "s0", "state_after": "no goals"}]}]
    records = {"new": {**dataset[0], "full_name": "new", "traced_tactics": []}}
    pairs = [_pair("new", 0, "s0", "simp", "no goals"),  # already in the data (marks removed)
             _pair("new", 0, "s1", "ring", "no goals"),
             _pair("new", 0, "s1", "ring", "no goals", member="other")]  # repeated by another member
    merged, report = ds.merge_pairs(dataset, records, pairs, 1)
    assert [p.tactic for p in report.added] == ["ring"] and len(report.duplicates) == 2
    assert report.counts()["pairs_added_per_member"] == {"m": 1}
    assert merged[1]["full_name"] == "new" and merged[1]["expert_iteration"] == {"iteration": 1, "members": ["m"]}
    with pytest.raises(KeyError, match="not in the unproved set"):
        ds.merge_pairs(dataset, records, [_pair("stranger", 0, "s", "t", "no goals")], 1)


def test_replay_proof_rejects_broken_proofs():
    env = ReplayEnvironment.from_benchmark()
    proof = env.connected_proofs()[0]
    theorem = Theorem(proof.theorem_id)
    pairs = ds.replay_proof(env, theorem, proof.tactics, iteration=1, member="m")
    assert [p.tactic for p in pairs] == list(proof.tactics) and pairs[-1].state_after == "no goals"
    assert all(a.state_after == b.state_before for a, b in zip(pairs, pairs[1:]))
    with pytest.raises(ds.ReplayError, match="failed on replay"):
        ds.replay_proof(env, theorem, ["definitely_not_a_tactic"], iteration=1, member="m")
    with pytest.raises(ds.ReplayError, match="closed at step"):
        ds.replay_proof(env, theorem, [*proof.tactics, "simp"], iteration=1, member="m")
    if len(proof.tactics) > 1:
        with pytest.raises(ds.ReplayError, match="goals remain"):
            ds.replay_proof(env, theorem, proof.tactics[:-1], iteration=1, member="m")


def test_initial_split_holds_the_evaluation_set_out_of_everything_trained_on():
    theorems = ds.read_raw(Path(__import__("training.data", fromlist=["SAMPLE_PATH"]).SAMPLE_PATH))
    train, unproved, evaluation = ds.initial_split(theorems, eval_fraction=0.2, holdout_fraction=0.5, seed=0)
    ids = lambda items: {t["full_name"] for t in items}  # noqa: E731
    assert evaluation and all(t["traced_tactics"] for t in evaluation)
    assert not ids(evaluation) & ids(train) and not ids(evaluation) & ids(unproved)
    assert ids(train) | ids(unproved) | ids(evaluation) == ids(theorems)
    assert ds.initial_split(theorems, eval_fraction=0.2, holdout_fraction=0.5, seed=0) == (train, unproved, evaluation)
    # A given unproved set is searched and trained on: its theorems leave the evaluation set.
    given = evaluation[:2]
    _, searched, kept = ds.initial_split(theorems, eval_fraction=0.2, holdout_fraction=0.5, seed=0, unproved=given)
    assert searched == given and not ids(kept) & ids(given)


def test_holdout_split_is_deterministic_and_disjoint():
    from training.data import SAMPLE_PATH

    theorems = ds.read_raw(SAMPLE_PATH)
    train, held = ds.holdout_split(theorems, 0.3, 0)
    assert (train, held) == ds.holdout_split(theorems, 0.3, 0)
    assert len(train) + len(held) == len(theorems) and all(t["traced_tactics"] for t in held)
    assert not {t["full_name"] for t in train} & {t["full_name"] for t in held}


def test_cli_reports_bad_input(tmp_path):
    import typer
    from typer.testing import CliRunner

    from prover.cli.expert import expert_iteration_command

    app = typer.Typer()
    app.command()(expert_iteration_command)
    result = CliRunner().invoke(app, ["--run-dir", str(tmp_path), "--n-eff", "1,x"])
    assert result.exit_code == 2 and "--n-eff" in result.output
    result = CliRunner().invoke(app, ["--run-dir", str(tmp_path), "--search-generator", "oracle", "--env", "repl"])
    assert result.exit_code == 2 and "needs env 'replay'" in result.output


def test_config_rejects_inconsistent_settings():
    from prover.expert_iteration import ExpertConfigError

    with pytest.raises(ExpertConfigError, match="miniF2F needs a Lean"):
        load_expert_config(None, eval_benchmark="minif2f")
    with pytest.raises(ExpertConfigError, match="train_overrides may not set data"):
        load_expert_config(None, train_overrides={"data": "x.json"})
    with pytest.raises(ExpertConfigError, match="n_effs must be distinct"):
        load_expert_config(None, n_effs=[1, 1])
