"""The end-to-end job (`dco-prover pipeline`) on a reduced budget: every stage runs, the
split never leaks a theorem, the report agrees with the evaluation's results, and a rerun
resumes instead of redoing work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prover.pipeline import PipelineSettings, run_pipeline
from search.budget import Budget


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[PipelineSettings, object, list[str]]:
    settings = PipelineSettings(
        output_dir=tmp_path_factory.mktemp("pipeline"),
        train_overrides={"epochs": 3, "save_every_steps": 1000},
        n_effs=(1, 16),
        budget=Budget(max_passes=2, time_limit_s=30.0),
        parallel_passes=2,
        progress=False,
    )
    log: list[str] = []
    result = run_pipeline(settings, log=log.append)
    return settings, result, log


def test_split_is_by_theorem_and_training_saw_only_train(pipeline_run) -> None:
    settings, _, _ = pipeline_run
    split = json.loads((settings.output_dir / "split.json").read_text())
    assert split["train"] and split["heldout"]
    assert not set(split["train"]) & set(split["heldout"])
    trained_on = {r["full_name"] for r in json.loads((settings.output_dir / "benchmarks" / "train.json").read_text())}
    assert trained_on == set(split["train"])
    for member in ("neff-1", "neff-16"):
        recorded = json.loads((settings.output_dir / "models" / member / "final" / "dco_training.json").read_text())
        assert Path(recorded["config"]["data"]).name == "train.json"


def test_report_agrees_with_results_file(pipeline_run) -> None:
    settings, result, _ = pipeline_run
    lines = [json.loads(l) for l in (settings.output_dir / "eval" / "results.jsonl").read_text().splitlines()]
    members = {r["member"] for r in lines}
    assert {"neff-1", "neff-16"} <= members
    summary = result.summary["eval_summary"]
    for bench_name, bench in summary["benchmarks"].items():
        for member, row in bench["rows"].items():
            proved = sum(1 for r in lines if r["member"] == member and r["benchmark"] == bench_name
                         and r["result"]["status"] == "proved")
            assert row["proved"] == proved
    report = result.report_md.read_text()
    assert "| neff-16 | 16 |" in report and "ensemble" in report
    assert result.summary["confidence_mean_p"]["train"].keys() == {"neff-1", "neff-16"}
    # One evaluation run gives Table 2 with the equal-compute row (CE with 2× the passes, 2
    # members) and the compute per row, and Table 4 (pass@n) from the same sampling run.
    assert "neff-1 ×2" in members
    assert "| neff-1 ×2 (equal compute) |" in report and "| generator calls | Lean calls | wall time (s) |" in report
    assert "pass@n" in report and "pass@2" in report and "plots/pass_at_n_" in report
    baseline = [r for r in lines if r["member"] == "neff-1 ×2"]
    assert baseline and all(r["result"]["passes"] <= 4 for r in baseline)


def test_rerun_resumes_without_new_work(pipeline_run) -> None:
    settings, _, _ = pipeline_run
    results = settings.output_dir / "eval" / "results.jsonl"
    before = results.read_bytes()
    log: list[str] = []
    run_pipeline(settings, log=log.append)
    assert results.read_bytes() == before
