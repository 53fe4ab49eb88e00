"""`dco-prover eval` under Ray: two prover actors, two generator actors (a two-member
ensemble of tiny Qwen2 checkpoints trained for a few steps), a prover actor killed mid-run,
then a resume that adds nothing. One Ray session for the module (start-up is slow)."""

from __future__ import annotations

from collections import Counter

import pytest

ray = pytest.importorskip("ray", reason="needs Ray: pip install -e '.[dist]'")

from prover.eval.config import Distribution, EnvSpec, EvalConfig, GeneratorOptions, parse_members, resolve_benchmark  # noqa: E402
from prover.eval.records import ENSEMBLE  # noqa: E402
from prover.eval.rundir import RunDirectory  # noqa: E402
from prover.eval.runner import run_eval  # noqa: E402
from prover.eval.summary import check_summary_against_records, summarize  # noqa: E402
from search.budget import Budget  # noqa: E402


@pytest.fixture(scope="module")
def ray_session():
    if ray.is_initialized():
        yield ray
        return
    ray.init(num_cpus=2, object_store_memory=96 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Two tiny checkpoints (N_eff 1 and 4) trained for 2 steps each by the trainer, and their manifest."""
    from training.config import load_config
    from training.ensemble import EnsembleMember, member_name, write_manifest
    from training.trainer import train

    root = tmp_path_factory.mktemp("ensemble")
    members = []
    for n_eff in (1, 4):
        config = load_config(
            "tiny", output_dir=root / member_name(n_eff), n_eff=n_eff, max_steps=2, batch_size=4, micro_batch_size=4,
            max_length=256, progress=False, save_every_steps=0,
        )
        result = train(config)
        members.append(EnsembleMember(name=member_name(n_eff), n_eff=n_eff, checkpoint=str(result.checkpoint), base_model="tiny-qwen2", steps=result.steps))
    return write_manifest(root / "ensemble.json", members)


def test_two_prover_actors_survive_a_kill_and_resume_adds_nothing(ray_session, manifest, tmp_path):
    bench = resolve_benchmark("leandojo")
    config = EvalConfig(
        benchmarks=(bench,),
        members=tuple(parse_members(None, str(manifest), None)),
        env=EnvSpec("replay", (bench.path,)),
        strategy="best_first",
        budget=Budget(max_expansions=2, tactics_per_expansion=2, time_limit_s=60),
        generator_options=GeneratorOptions(max_new_tokens=12),
        distribution=Distribution(workers=2, use_ray=True, max_retries=2),
    )
    assert config.member_names == ["neff-1", "neff-4"]
    killed: list[str] = []

    def kill_one(dispatch: int, actor, task) -> None:
        # The task was just handed over; a theorem the replay environment opens is searched
        # with the models (tens of ms at least), so it is still in flight when the kill lands.
        if dispatch >= 3 and not killed and task.theorem.metadata.get("traced_tactics"):
            ray_session.kill(actor, no_restart=True)
            killed.append(task.theorem.id)

    run_dir = tmp_path / "run"
    outcome = run_eval(config, run_dir, on_dispatch=kill_one)
    theorems = [t.id for t in bench.load()]
    assert outcome.summary["complete"] and outcome.new_theorems == len(theorems)
    assert outcome.report.backend == "ray" and outcome.report.workers == 2
    assert outcome.report.worker_failures >= 1 and outcome.report.workers_replaced >= 1 and not outcome.report.gave_up

    records = RunDirectory(run_dir).records()
    counts = Counter((r.theorem_id, r.member) for r in records)
    assert set(counts.values()) == {1} and len(counts) == 3 * len(theorems)  # every theorem, every line, once
    by_key = {(r.theorem_id, r.member): r for r in records}
    assert by_key[(killed[0], ENSEMBLE)].attempts == 2  # retried on a fresh actor
    # the generator actors batched the prover actors' requests into generate calls
    for member in ("neff-1", "neff-4"):
        stats = outcome.report.batching[member]
        assert stats["calls"] > 0 and stats["states"] >= stats["calls"]

    # the summary agrees with the results file, on disk and recomputed
    assert check_summary_against_records(outcome.summary, records) == []
    on_disk = (run_dir / "summary.json").read_text()
    recomputed = summarize(records, strategy="best_first", expected={bench.name: theorems}, members=config.member_names)
    rows = recomputed["benchmarks"][bench.name]["rows"]
    assert rows == outcome.summary["benchmarks"][bench.name]["rows"] and f'"recorded": {len(theorems)}' in on_disk
    table = (run_dir / "table.md").read_text()
    assert "| neff-1 |" in table and "| neff-4 |" in table and "| **ensemble** |" in table
    assert list((run_dir / "plots").glob("*.png"))

    before = (run_dir / "results.jsonl").read_bytes()
    again = run_eval(config, run_dir, resume=True, retry_errors=False)  # errors (unreplayable theorems) kept
    assert again.new_theorems == 0 and again.skipped == len(theorems)
    assert (run_dir / "results.jsonl").read_bytes() == before
