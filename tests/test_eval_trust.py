"""Issue 13: an evaluation a researcher can trust — errors apart from failures, exit codes,
resume rules, reproducible numbers whatever the number of workers, the equal-compute
baseline row, Table 4's pass@n, the shared ensemble mode."""

from __future__ import annotations

import json
import math

import pytest
import typer
from typer.testing import CliRunner

from prover.cli.evaluate import eval_command
from prover.eval.config import Distribution, EnvSpec, EvalConfig, GeneratorOptions, MemberSpec, identity, resolve_benchmark
from prover.eval.local_backend import LocalBackend
from prover.eval.records import ENSEMBLE
from prover.eval.rundir import RunDirectory, RunDirectoryError
from prover.eval.runner import run_eval
from prover.eval.summary import pass_at
from prover.replay import ReplayEnvironment
from search.budget import Budget

TIMING = ("generator_time_s", "lean_time_s", "wall_time_s")


@pytest.fixture(scope="module")
def bench():
    return resolve_benchmark("leandojo")


@pytest.fixture(scope="module")
def startable(bench):
    """The first theorems of the sample the replay environment can open."""
    return ReplayEnvironment.from_benchmark(bench.path).startable_ids


def _config(bench, workers=1, **overrides) -> EvalConfig:
    values = dict(
        benchmarks=(bench,),
        members=(MemberSpec("oracle", "oracle", "oracle"), MemberSpec("fixed", "fixed", "fixed")),
        env=EnvSpec("replay", (bench.path,)),
        strategy="sampling",
        budget=Budget(max_passes=12, time_limit_s=60),
        distribution=Distribution(workers=workers, use_ray=False, max_retries=0),
        limit=14,
    )
    values.update(overrides)
    return EvalConfig(**values)


def _comparable(run_dir) -> dict:
    """Every record, keyed by theorem and member, without wall-clock measurements."""
    out = {}
    for record in RunDirectory(run_dir).records():
        result = {k: v for k, v in record.result.items() if k not in TIMING}
        out[(record.theorem_id, record.member)] = (record.status, json.dumps(result, sort_keys=True))
    return out


def _cli():
    app = typer.Typer()
    app.command("eval")(eval_command)
    app.command("noop")(lambda: None)
    return app, CliRunner()


# ----------------------------------------------------------------------------- reproducible


def test_one_and_two_workers_give_identical_records(tmp_path, bench):
    one = run_eval(_config(bench, workers=1), tmp_path / "one")
    two = run_eval(_config(bench, workers=2), tmp_path / "two")
    assert one.summary["proved"] == two.summary["proved"] > 0
    a, b = _comparable(tmp_path / "one"), _comparable(tmp_path / "two")
    assert a.keys() == b.keys() and a == b


def test_members_do_not_see_each_others_cache_hits(tmp_path, bench):
    members = (MemberSpec("fixed", "fixed", "fixed"), MemberSpec("twin", "fixed", "fixed"))
    config = _config(bench, members=members, strategy="best_first", budget=Budget(max_expansions=4, tactics_per_expansion=4, time_limit_s=60), limit=6)
    run_eval(config, tmp_path / "run")
    rows = {(r.theorem_id, r.member): r.result for r in RunDirectory(tmp_path / "run").records()}
    searched = [tid for (tid, m), res in rows.items() if m == "fixed" and res["lean_calls"]]
    assert searched
    for tid in searched:
        first, twin = rows[(tid, "fixed")], rows[(tid, "twin")]
        # the same generator searched again: it pays the same Lean calls (its own cache)
        assert twin["cache_hits"] == first["cache_hits"] and twin["cache_misses"] == first["cache_misses"] > 0


# ----------------------------------------------------------------------------- errors


class DownModel:
    """A model endpoint that is down: every call raises."""

    name = "oracle"

    def propose(self, states, k, **kwargs):
        raise ConnectionError("model endpoint http://gpu-7:8000 refused the connection")


def test_a_dead_generator_is_an_error_with_its_cause_and_resume_retries_it(tmp_path, bench, startable):
    from prover.generators.fixed import FixedTacticGenerator
    from prover.generators.oracle import OracleGenerator

    config = _config(bench, limit=4)
    broken = LocalBackend(config, generators={"oracle": DownModel(), "fixed": FixedTacticGenerator(name="fixed")})
    first = run_eval(config, tmp_path / "run", backend=broken)
    rows = first.summary["benchmarks"][bench.name]["rows"]
    # of the first 4 theorems, the replayable ones hit the dead generator (errors); the others
    # are refused by the replay (not replayable: a property of the data, not an error)
    searched = sum(1 for tid in [t.id for t in bench.load()][:4] if tid in startable)
    assert 0 < searched < 4
    assert rows[ENSEMBLE]["theorems"] == 4 and rows[ENSEMBLE]["errors"] == searched and rows[ENSEMBLE]["failed"] == 0
    assert rows[ENSEMBLE]["not_replayable"] == 4 - searched
    assert first.summary["pass_rate"] == 0.0 and first.summary["errors"] == searched  # every theorem in the denominator
    causes = [e["error"] for e in rows[ENSEMBLE]["error_examples"]]
    assert any("refused the connection" in c for c in causes)
    assert "| errors |" in (tmp_path / "run" / "table.md").read_text()

    kept = run_eval(config, tmp_path / "run", resume=True, retry_errors=False, backend=broken)
    assert kept.new_theorems == 0 and kept.summary["errors"] == searched

    working = LocalBackend(config, generators={"oracle": OracleGenerator(ReplayEnvironment.from_benchmark(bench.path)), "fixed": FixedTacticGenerator(name="fixed")})
    again = run_eval(config, tmp_path / "run", resume=True, backend=working)
    assert again.new_theorems == searched and again.summary["last_invocation"]["retried_errors"] == searched
    assert again.summary["errors"] == 0
    assert (tmp_path / "run" / "retried_errors.jsonl").read_text().count("\n") == searched * 3
    assert len(RunDirectory(tmp_path / "run").records()) == 4 * 3


def test_eval_exits_2_when_nothing_can_start(tmp_path):
    from prover.runner import lean_problems

    if not lean_problems():
        pytest.skip("Lean is installed here: the REPL environment can start")
    app, runner = _cli()
    result = runner.invoke(app, ["eval", "--benchmark", "minif2f@test", "--generator", "fixed", "--run-dir", str(tmp_path / "r"), "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "nothing could start" in result.output and "repl" in result.output
    assert not (tmp_path / "r" / "results.jsonl").exists()
    # Two benchmarks in one run, each in its own environment: LeanDojo data in replay, miniF2F
    # in the REPL; the REPL cannot start here, so the run is refused before anything starts.
    both = runner.invoke(app, ["eval", "--benchmark", "leandojo", "--benchmark", "minif2f@test", "--generator", "fixed",
                               "--run-dir", str(tmp_path / "b"), "--no-progress"])
    assert both.exit_code == 2 and "miniF2F test" in both.output and "'repl'" in both.output


def test_a_smaller_limit_on_resume_is_refused(tmp_path, bench):
    run_eval(_config(bench, limit=6), tmp_path / "run")
    with pytest.raises(RunDirectoryError, match="smaller --limit"):
        run_eval(_config(bench, limit=3), tmp_path / "run", resume=True)
    bigger = run_eval(_config(bench, limit=8), tmp_path / "run", resume=True, retry_errors=False)
    assert bigger.new_theorems == 2 and bigger.summary["benchmarks"][bench.name]["recorded"] == 8


def test_resume_accepts_changed_distribution_settings(tmp_path, bench):
    config = _config(bench, limit=3)
    run_eval(config, tmp_path / "run")
    moved = _config(
        bench,
        limit=3,
        distribution=Distribution(workers=2, use_ray=False, cpus_per_prover=2.0, gpu_fraction_per_model=0.5),
        generator_options=GeneratorOptions(device="cuda:1", gpu_memory_fraction=0.5),
    )
    assert identity(json.loads(json.dumps(config.to_json()))) == identity(json.loads(json.dumps(moved.to_json())))
    again = run_eval(moved, tmp_path / "run", resume=True, retry_errors=False)
    assert again.new_theorems == 0 and again.summary["complete"]


# ----------------------------------------------------------------------------- tables


def test_equal_compute_baseline_row_and_compute_columns(tmp_path, bench):
    config = _config(bench, baseline="fixed", limit=6)
    assert config.baseline_row == "fixed ×2"
    outcome = run_eval(config, tmp_path / "run")
    records = RunDirectory(tmp_path / "run").records()
    base = [r for r in records if r.member == "fixed ×2"]
    assert len(base) == 6 and all(r.result["passes"] <= 24 for r in base)
    assert any(r.result["passes"] > 12 for r in base)  # it really had twice the passes
    rows = outcome.summary["benchmarks"][bench.name]["rows"]
    assert rows["fixed ×2"]["baseline"] and rows["fixed ×2"]["pass_at_limit"] == 24
    ensemble_passes = rows[ENSEMBLE]["compute"]["passes"]
    assert ensemble_passes == rows["oracle"]["compute"]["passes"] + rows["fixed"]["compute"]["passes"]  # not the baseline's
    table = (tmp_path / "run" / "table.md").read_text()
    assert "| fixed ×2 (equal compute) |" in table and "| generator calls | Lean calls | wall time (s) |" in table
    assert "## pass@n" in table and list((tmp_path / "run" / "plots").glob("pass_at_n_*.png"))


def test_pass_at_n_is_the_first_success_indicator_mean(tmp_path, bench):
    outcome = run_eval(_config(bench, limit=10, budget=Budget(max_passes=20, time_limit_s=60)), tmp_path / "run")
    records = [r for r in RunDirectory(tmp_path / "run").records() if r.member == "oracle"]
    indices = [r.result["first_success_pass"] for r in records]
    assert all((i is not None) == r.proved for i, r in zip(indices, records))
    row = outcome.summary["benchmarks"][bench.name]["rows"]["oracle"]
    for n in (1, 2, 4, 8, 16, 20):
        assert row["pass_at"][str(n)] == pytest.approx(sum(1 for i in indices if i is not None and i <= n) / len(records))
    assert row["pass_at"]["20"] == row["pass_rate"]
    assert pass_at([1, 5, None, 17], 16) == 0.5 and pass_at([], 4) == 0.0


def test_pass_at_n_indicator_is_unbiased_against_the_binomial_estimator() -> None:
    # A theorem proved by each pass with probability q: E[first success <= n] = 1 - (1-q)^n.
    import random

    rng = random.Random(3)
    q, n, trials = 0.05, 16, 20000
    hits = 0
    for _ in range(trials):
        first = next((i for i in range(1, 65) if rng.random() < q), None)
        hits += first is not None and first <= n
    assert hits / trials == pytest.approx(1 - (1 - q) ** n, abs=0.01)
    assert math.isclose(pass_at([3] * 7 + [None] * 3, 4), 0.7)


def test_shared_mode_splits_the_budget_between_members(tmp_path, bench):
    outcome = run_eval(_config(bench, ensemble="shared", limit=6), tmp_path / "run")
    by_theorem: dict[str, int] = {}
    for r in RunDirectory(tmp_path / "run").records():
        if r.member != ENSEMBLE:
            assert r.result["passes"] <= 6
            by_theorem[r.theorem_id] = by_theorem.get(r.theorem_id, 0) + r.result["passes"]
    assert max(by_theorem.values()) <= 12
    assert outcome.summary["ensemble_mode"] == "shared"


def test_ray_with_two_actors_gives_the_local_records(tmp_path, bench):
    pytest.importorskip("ray", reason="needs Ray: pip install -e '.[dist]'")
    config = _config(bench, limit=8)
    run_eval(config, tmp_path / "local")
    ray_config = _config(bench, limit=8, distribution=Distribution(workers=2, use_ray=True, max_retries=0, object_store_mb=96))
    run_eval(ray_config, tmp_path / "ray")
    assert _comparable(tmp_path / "local") == _comparable(tmp_path / "ray")


class CrashingEnv:
    """A replay environment whose Lean process dies on every tactic (past its restarts)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def start(self, theorem):
        return self.inner.start(theorem)

    def apply(self, state, tactic, timeout_s=None):
        raise BrokenPipeError("lean process exited with signal 9 (restart limit reached)")

    def verify(self, theorem, tactics):
        return self.inner.verify(theorem, tactics)


def test_an_environment_that_crashes_on_every_call_is_an_error_not_a_failure(tmp_path, bench, startable):
    from prover.eval.worker import ProverWorker

    config = _config(bench, limit=6)
    env = CrashingEnv(ReplayEnvironment.from_benchmark(bench.path))
    backend = LocalBackend(config, worker_factory=lambda c, g: ProverWorker(c, g, env=env))
    outcome = run_eval(config, tmp_path / "run", backend=backend)
    records = [r for r in RunDirectory(tmp_path / "run").records() if r.member == ENSEMBLE]
    searched = [r for r in records if r.theorem_id in startable]
    assert searched and all(r.status == "error" and "crashed on every one" in r.error for r in searched)
    assert outcome.summary["errors"] == len(searched) and outcome.summary["proved"] == 0
    assert outcome.summary["benchmarks"][bench.name]["rows"][ENSEMBLE]["not_replayable"] == 6 - len(searched)


def test_pass_at_from_count_is_the_binomial_estimator() -> None:
    from math import comb

    from prover.eval.summary import pass_at_from_count

    for N, c in ((20, 3), (64, 1), (64, 60), (10, 0)):
        for n in (1, 4, 10, 16, 20):
            if n <= N:
                expected = 1 - comb(N - c, n) / comb(N, n)
                assert pass_at_from_count(N, c, n) == pytest.approx(expected)
    assert pass_at_from_count(4096, 5, 4096) == 1.0 and pass_at_from_count(10, 2, 16) == 1.0


def test_all_passes_run_uses_the_success_counts(tmp_path, bench):
    outcome = run_eval(_config(bench, limit=8, all_passes=True, budget=Budget(max_passes=16, time_limit_s=60)), tmp_path / "run")
    records = [r for r in RunDirectory(tmp_path / "run").records() if r.member == "oracle"]
    assert all(r.result["successful_passes"] is not None for r in records if r.status != "error")
    proved = [r for r in records if r.proved]
    assert proved and all(r.result["passes"] == 16 for r in proved)
    from prover.eval.summary import pass_at_from_count

    row = outcome.summary["benchmarks"][bench.name]["rows"]["oracle"]
    expected = sum(pass_at_from_count(16, r.result["successful_passes"] or 0, 4) for r in records) / len(records)
    assert row["pass_at"]["4"] == pytest.approx(expected)


def test_identity_treats_a_benchmark_without_env_as_the_runs_default(bench):
    from dataclasses import replace

    plain = _config(bench)
    explicit = _config(bench, benchmarks=(replace(bench, env="replay"),))
    assert identity(json.loads(json.dumps(plain.to_json()))) == identity(json.loads(json.dumps(explicit.to_json())))
    other = _config(bench, benchmarks=(replace(bench, env="dojo"),))
    assert identity(json.loads(json.dumps(plain.to_json()))) != identity(json.loads(json.dumps(other.to_json())))
