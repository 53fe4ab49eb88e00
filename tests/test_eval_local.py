"""`dco-prover eval` on the in-process backend: replay environment, model-free generators."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import typer
from typer.testing import CliRunner

from prover.cli.evaluate import eval_command
from prover.eval.config import Distribution, EnvSpec, EvalConfig, MemberSpec, resolve_benchmark
from prover.eval.local_backend import LocalBackend
from prover.eval.records import ENSEMBLE
from prover.eval.rundir import RunDirectory
from prover.eval.runner import run_eval
from prover.eval.summary import check_summary_against_records
from prover.eval.worker import ProverWorker
from prover.replay import ReplayEnvironment
from search.budget import Budget


@pytest.fixture(scope="module")
def bench():
    return resolve_benchmark("leandojo")


def _config(bench, workers=2, **overrides) -> EvalConfig:
    values = dict(
        benchmarks=(bench,),
        members=(MemberSpec("oracle", "oracle", "oracle"), MemberSpec("fixed", "fixed", "fixed")),
        env=EnvSpec("replay", (bench.path,)),
        strategy="best_first",
        budget=Budget(max_expansions=8, tactics_per_expansion=4, time_limit_s=30),
        distribution=Distribution(workers=workers, use_ray=False, max_retries=1),
    )
    values.update(overrides)
    return EvalConfig(**values)


def _keys(run_dir):
    return Counter((r.theorem_id, r.member) for r in RunDirectory(run_dir).records())


def test_full_run_then_resume_after_a_simulated_kill(tmp_path, bench):
    config = _config(bench)
    run_dir = tmp_path / "run"
    first = run_eval(config, run_dir)
    replay = ReplayEnvironment.from_benchmark(bench.path)
    n = len(replay.theorem_ids)
    assert first.new_theorems == n and first.summary["complete"]
    rows = first.summary["benchmarks"][bench.name]["rows"]
    # denominator honesty: theorems the replay environment refuses stay in the denominator,
    # counted as not replayable (with their reason), not as infrastructure errors
    assert rows[ENSEMBLE]["theorems"] == n
    assert rows[ENSEMBLE]["not_replayable"] == len(replay.not_replayable) > len(replay.without_tactics) > 0
    assert rows[ENSEMBLE]["errors"] == 0
    assert rows[ENSEMBLE]["failed"] == n - rows[ENSEMBLE]["proved"] - rows[ENSEMBLE]["not_replayable"]
    # issue 10: the summary counts the theorems the replay refused, by reason
    counts = replay.replayability_counts()
    assert first.summary["benchmarks"][bench.name]["replayability"] == counts and counts["theorems"] == n
    assert f"{counts['not_replayable']} of {n} theorem(s) not replayable" in (run_dir / "table.md").read_text()
    assert rows[ENSEMBLE]["proved"] >= rows["oracle"]["proved"] > 0
    records = RunDirectory(run_dir).records()
    assert check_summary_against_records(first.summary, records) == []
    assert set(Counter(r.member for r in records).values()) == {n}
    assert (run_dir / "table.md").read_text().count("| oracle |") == 1
    assert list((run_dir / "plots").glob("*.png"))

    # A kill mid-write: keep the first 40% of the bytes (cutting through a group) and rerun.
    results = run_dir / "results.jsonl"
    data = results.read_bytes()
    results.write_bytes(data[: int(len(data) * 0.4)])
    kept_records = RunDirectory(run_dir).load().records
    kept = len(kept_records) // 3
    kept_errors = sum(1 for r in kept_records if r.member == ENSEMBLE and r.status == "error")
    assert kept_errors > 0  # refusals by the replay: status error, yet not retried (searching again changes nothing)
    second = run_eval(config, run_dir, resume=True)
    assert second.skipped == kept and second.new_theorems == n - kept
    assert second.dropped_torn_lines >= 1
    keys = _keys(run_dir)
    assert len(keys) == 3 * n and set(keys.values()) == {1}  # every theorem, each member, once
    assert check_summary_against_records(second.summary, RunDirectory(run_dir).records()) == []
    # nothing left to do but errors: without retrying them a third run adds nothing and
    # leaves the file byte-identical
    before = results.read_bytes()
    third = run_eval(config, run_dir, resume=True, retry_errors=False)
    assert third.new_theorems == 0 and results.read_bytes() == before
    assert json.loads((run_dir / "summary.json").read_text())["recorded"] == n


class FlakyWorker(ProverWorker):
    """Raises (as a crashed backend would) on `always` theorems, and once on `once` theorems."""

    seen: Counter = Counter()
    always = ""  # set by the test
    once = ""

    def prove(self, task, cancel=None):
        FlakyWorker.seen[task.theorem.id] += 1
        if task.theorem.id == self.always or (task.theorem.id == self.once and task.attempt == 1):
            raise RuntimeError(f"backend crashed on {task.theorem.id}")
        return super().prove(task, cancel)


def test_failing_worker_is_replaced_and_its_theorem_retried_then_recorded(tmp_path, bench):
    ids = [t.id for t in bench.load()][:10]
    FlakyWorker.always, FlakyWorker.once = ids[3], ids[4]
    config = _config(bench, limit=len(ids))
    FlakyWorker.seen.clear()
    outcome = run_eval(config, tmp_path / "run", backend=LocalBackend(config, worker_factory=FlakyWorker))
    assert outcome.summary["complete"]
    assert outcome.report.gave_up == [FlakyWorker.always]
    assert FlakyWorker.seen[FlakyWorker.always] == 2 and FlakyWorker.seen[FlakyWorker.once] == 2  # max_retries=1
    assert outcome.report.worker_failures == 3 and outcome.report.workers_replaced == 3
    by_key = {(r.theorem_id, r.member): r for r in RunDirectory(tmp_path / "run").records()}
    lost = by_key[(FlakyWorker.always, ENSEMBLE)]
    assert lost.status == "error" and lost.attempts == 2 and "backend crashed" in lost.error
    retried = by_key[(FlakyWorker.once, ENSEMBLE)]
    assert retried.attempts == 2 and retried.status != "error"


def test_cli_eval(tmp_path):
    app = typer.Typer()
    app.command("eval")(eval_command)
    app.command("noop")(lambda: None)  # a second command keeps typer's subcommand parsing
    runner = CliRunner()
    run_dir = tmp_path / "cli"
    args = ["eval", "--generator", "oracle", "--run-dir", str(run_dir), "--limit", "12", "--max-expansions", "6",
            "--workers", "2", "--no-ray", "--no-progress"]
    result = runner.invoke(app, args)
    # The sample's first 12 theorems include some the replay environment refuses (no traced
    # tactics): kept in the denominator as not replayable, with the reason; no infrastructure
    # error, so the exit status is 0 and a resume has nothing to retry.
    assert result.exit_code == 0, result.output
    assert "not replayable (no_traced_tactics" in result.output and "ended in an error" not in result.output
    assert "pass rate (ensemble): LeanDojo random_test_head " in result.output
    assert "/12 = " in result.output
    for name in ("config.json", "results.jsonl", "summary.json", "table.md"):
        assert (run_dir / name).is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["errors"] == 0
    assert summary["benchmarks"]["leandojo:random_test_head"]["rows"]["ensemble"]["not_replayable"] > 0
    again = runner.invoke(app, args + ["--resume"])
    assert again.exit_code == 0 and "0 theorem(s) evaluated now, 12 already recorded" in again.output
    changed = runner.invoke(app, args + ["--resume", "--max-expansions", "7"])
    assert changed.exit_code == 2 and "different settings (budget)" in changed.output
    missing = runner.invoke(app, ["eval", "--generator", "fixed", "--benchmark", str(tmp_path / "nope.json"), "--run-dir", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    both = runner.invoke(app, ["eval", "--generator", "fixed", "--models", "tiny-qwen2", "--run-dir", str(tmp_path / "y")])
    assert both.exit_code == 2 and "exactly one of" in both.output


class BrokenModel:
    """A generator whose every call raises (a dead GPU, an OOM)."""

    name = "oracle"

    def propose(self, states, k):
        raise RuntimeError("CUDA error: out of memory")


def test_a_search_without_a_working_generator_is_an_error_not_a_failure(tmp_path, bench):
    from prover.generators.fixed import FixedTacticGenerator

    config = _config(bench, workers=1, limit=6)
    backend = LocalBackend(config, generators={"oracle": BrokenModel(), "fixed": FixedTacticGenerator(name="fixed")})
    outcome = run_eval(config, tmp_path / "run", backend=backend)
    records = [r for r in RunDirectory(tmp_path / "run").records() if r.member == ENSEMBLE]
    assert len(records) == 6 and {r.status for r in records} == {"error"}
    startable = [r for r in records if r.attempts == 2]  # retried once (max_retries=1), then recorded
    assert startable and all("out of memory" in r.error for r in startable)
    assert outcome.report.gave_up == [r.theorem_id for r in startable]
