"""Run directory, records, summary, Table-2 Markdown and plots of `prover.eval` (no search)."""

from __future__ import annotations

import json
import os

import pytest

from prover.eval.records import ENSEMBLE, EvalRecord, combine_independent, error_group, records_for_theorem
from prover.eval.report import table_markdown, write_plots
from prover.eval.rundir import RunDirectory, RunDirectoryError, parse_results
from prover.eval.summary import check_summary_against_records, pass_rate_curve, summarize
from search.budget import Budget
from search.result import SearchResult, Status

BENCH = "leandojo:sample"


def _result(tid: str, status: Status, member: str, passes: int = 0, expansions: int = 0) -> SearchResult:
    proved = status is Status.PROVED
    return SearchResult(
        theorem_id=tid,
        status=status,
        strategy="best_first",
        proof=["simp"] if proved else None,
        verified=proved,
        member=member,
        passes=passes,
        expansions=expansions,
        wall_time_s=0.5,
    )


def _group(tid: str, a: Status, b: Status, ea: int = 3, eb: int = 5) -> list[EvalRecord]:
    members = {"neff1": _result(tid, a, "neff1", expansions=ea), "neff4": _result(tid, b, "neff4", expansions=eb)}
    return records_for_theorem(BENCH, tid, combine_independent(tid, "best_first", members), members)


def test_combine_independent_is_the_union_of_member_proofs():
    members = {
        "neff1": _result("t", Status.BUDGET_EXHAUSTED, "neff1", expansions=10),
        "neff4": _result("t", Status.PROVED, "neff4", expansions=4),
    }
    combined = combine_independent("t", "best_first", members)
    assert combined.status is Status.PROVED and combined.member == "neff4" and combined.proof == ["simp"]
    assert combined.expansions == 14  # the compute the ensemble spent
    assert combine_independent("t", "best_first", {"a": _result("t", Status.ERROR, "a")}).status is Status.ERROR
    # An errored member makes the unproved ensemble an error (not a timeout or a failure)...
    mixed = {"a": _result("t", Status.ERROR, "a"), "b": _result("t", Status.TIMEOUT, "b")}
    assert combine_independent("t", "best_first", mixed).status is Status.ERROR
    # ...but a verified proof of another member stands.
    proved = {"a": _result("t", Status.ERROR, "a"), "b": _result("t", Status.PROVED, "b")}
    assert combine_independent("t", "best_first", proved).status is Status.PROVED


def test_record_rejects_contradictions():
    with pytest.raises(ValueError, match="contradicts"):
        EvalRecord(BENCH, "t", "m", "failed", True, 1)
    with pytest.raises(ValueError):
        EvalRecord(BENCH, "t", "m", "nonsense", False, 1)
    with pytest.raises(ValueError, match="reserved"):
        records_for_theorem(BENCH, "t", _result("t", Status.FAILED, "x"), {ENSEMBLE: _result("t", Status.FAILED, "x")})


def test_groups_round_trip_and_torn_tail_is_cut(tmp_path):
    run = RunDirectory.create(tmp_path / "run", {"x": 1})
    run.append_group(_group("t1", Status.PROVED, Status.FAILED))
    run.append_group(_group("t2", Status.FAILED, Status.FAILED))
    run.close()
    data = (tmp_path / "run" / "results.jsonl").read_bytes()
    assert data.count(b"\n") == 6
    report = parse_results(data)
    assert report.complete_theorems == 2 and report.dropped_lines == 0
    # A kill in the middle of the third group's write: one whole line and half of the next.
    third = b"".join(json.dumps(r.to_json()).encode() + b"\n" for r in _group("t3", Status.FAILED, Status.PROVED))
    lines = third.split(b"\n")
    torn = data + lines[0] + b"\n" + lines[1][:40]
    (tmp_path / "run" / "results.jsonl").write_bytes(torn)
    resumed, loaded = RunDirectory.open_for_resume(tmp_path / "run", {"x": 1}, lambda c: c)
    assert loaded.complete_theorems == 2 and loaded.dropped_lines == 2
    assert (tmp_path / "run" / "results.jsonl").read_bytes() == data  # repaired in place
    resumed.close()


def test_corruption_in_the_middle_and_duplicates_are_errors():
    good = b"".join(json.dumps(r.to_json()).encode() + b"\n" for r in _group("t1", Status.PROVED, Status.FAILED))
    half = b"".join(json.dumps(r.to_json()).encode() + b"\n" for r in _group("t2", Status.PROVED, Status.FAILED)[:2])
    with pytest.raises(RunDirectoryError, match="incomplete but is followed"):
        parse_results(half + good)
    with pytest.raises(RunDirectoryError, match="recorded twice"):
        parse_results(good + good)
    with pytest.raises(RunDirectoryError, match="line 1"):
        parse_results(b"{not json}\n" + good)


def test_resume_refuses_other_settings_and_concurrent_writers(tmp_path):
    run = RunDirectory.create(tmp_path / "run", {"strategy": "best_first"})
    with pytest.raises(RunDirectoryError, match="being written by process"):
        RunDirectory.open_for_resume(tmp_path / "run", {"strategy": "best_first"}, lambda c: c)
    run.close()
    with pytest.raises(RunDirectoryError, match="different settings \\(strategy\\)"):
        RunDirectory.open_for_resume(tmp_path / "run", {"strategy": "sampling"}, lambda c: c)
    with pytest.raises(RunDirectoryError, match="already holds"):
        RunDirectory.create(tmp_path / "run", {})
    # the refused resume released its lock: a matching one goes through
    again, _ = RunDirectory.open_for_resume(tmp_path / "run", {"strategy": "best_first"}, lambda c: c)
    again.close()
    assert not (tmp_path / "run" / ".lock").exists()


def test_summary_counts_errors_in_the_denominator_and_curves():
    records = (
        _group("t1", Status.PROVED, Status.FAILED, ea=2)
        + _group("t2", Status.FAILED, Status.PROVED, eb=7)
        + _group("t3", Status.PROVED, Status.PROVED, ea=5, eb=1)
        + error_group(BENCH, "t4", "best_first", ["neff1", "neff4"], "environment could not start", attempts=1)
    )
    summary = summarize(records, strategy="best_first", expected={BENCH: ["t1", "t2", "t3", "t4"]}, members=["neff1", "neff4"])
    rows = summary["benchmarks"][BENCH]["rows"]
    assert rows["neff1"]["theorems"] == 4 and rows["neff1"]["proved"] == 2 and rows["neff1"]["pass_rate"] == 0.5
    assert rows[ENSEMBLE]["proved"] == 3 and rows[ENSEMBLE]["errors"] == 1 and rows[ENSEMBLE]["pass_rate"] == 0.75
    assert rows["neff1"]["curve"] == [[2, 0.25], [5, 0.5]]
    # ensemble at x: some member proved it within x of its own budget (t3 by neff4 at 1)
    assert rows[ENSEMBLE]["curve"] == [[1, 0.25], [2, 0.5], [7, 0.75]]
    assert summary["complete"] is True and summary["usage_metric"] == "expansions"
    assert check_summary_against_records(summary, records) == []
    summary["benchmarks"][BENCH]["rows"]["neff4"]["proved"] += 1
    assert check_summary_against_records(summary, records) == [f"{BENCH}/neff4: summary says 3/4, records say 2/4"]


def test_pass_rate_curve_steps():
    assert pass_rate_curve([3, None, 1, 3], 4) == [(1, 0.25), (3, 0.75)]
    assert pass_rate_curve([], 0) == []


def test_table_and_plots(tmp_path):
    records = _group("t1", Status.PROVED, Status.FAILED) + _group("t2", Status.FAILED, Status.FAILED)
    other = [EvalRecord(**{**r.to_json(), "benchmark": "minif2f:test"}) for r in _group("m1", Status.FAILED, Status.PROVED)]
    summary = summarize(records + other, strategy="sampling", expected={BENCH: ["t1", "t2"], "minif2f:test": ["m1", "m2", "m3"]},
                        labels={BENCH: "Mathlib sample", "minif2f:test": "miniF2F test"})
    budget = Budget(max_passes=128).to_json()
    table = table_markdown(summary, budget=budget, ensemble="independent")
    lines = table.splitlines()
    assert "pass@128 sampling" in table and "Budget per member" in table
    assert lines[4].startswith("| model | Mathlib sample (n=2) | errors | miniF2F test (n=1) | errors | passes | generator calls | Lean calls |")
    assert lines[6].startswith("| neff1 | 50.0% (1/2) | 0 | 0.0% (0/1) | 0 |")
    assert lines[7].startswith("| neff4 | 0.0% (0/2) | 0 | 100.0% (1/1) | 0 |")
    assert lines[8].startswith("| **ensemble** | **50.0% (1/2)** | 0 | **100.0% (1/1)** | 0 |")
    assert "miniF2F test: incomplete, 2 of the 3 selected theorems not recorded yet." in table
    assert summary["benchmarks"][BENCH]["complete"] and not summary["complete"]
    plots = write_plots(summary, tmp_path / "plots")
    assert len(plots) == 2
    for path in plots:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 5000
