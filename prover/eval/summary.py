"""Pass rates per benchmark and member, recomputed from the records (the single source of truth).

The denominator of a row is the number of theorems recorded for that benchmark: errors
(environment start failures, a dead generator, workers lost past their retries) stay in
it, never dropped, and are counted in their own column (`errors`), apart from `failed`
(searched, nothing found). `expected` names the theorems the run selected; `complete`
says whether every one of them is recorded (`missing` counts the others). Each row also
states the compute it spent: passes, expansions, generator calls, Lean calls, wall time.

Rows: the members, the ensemble and, when configured, the equal-compute baseline (one
member with M× the budget; never part of the ensemble).

pass@n (Table 4, sampling only): for a row and n up to that row's passes per theorem,
the mean over recorded theorems of `first_success_pass <= n`, where `first_success_pass`
is the lowest index of a pass that found a verified proof (see `search.sampling`). The
first n passes of N independent passes are n independent passes, so each theorem's
indicator is an unbiased estimate of its pass@n and the mean is unbiased for the
benchmark's. The ensemble's pass@n is the same with `min` over its members' indices
(every member with n passes of its own). For records without the index, a proof counts
at its `passes` (the number of passes started: an upper bound of the index). A member
record that counted its successful passes c among N (`--all-passes`) uses the
lower-variance unbiased `1 - C(N-c, n)/C(N, n)` instead of the indicator.

Pass-rate curves: for a member, the point `(x, y)` means a fraction `y` of the recorded
theorems was proved using at most `x` passes (sampling) or expansions (best-first) of that
member's budget. For the ensemble, a theorem counts at `x` once any member proved it
within `x` of its own budget (members searched independently, each with the same budget),
so the ensemble curve is the union of the member curves; without member records (a
mixture ensemble) the ensemble line's own count is used.

`replayability` (per benchmark): how many of the recorded theorems the replay environment
refused as not replayable, by reason category (`prover.replayability`); they are in every
denominator above, as errors, never dropped. Zero for runs on other environments.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any, Collection, Iterable, Mapping, Sequence

from prover.eval.records import ENSEMBLE, EvalRecord, is_infrastructure_error, not_replayable_reason, record_message
from prover.replayability import replayability_of_records

MAX_LISTED_ERRORS = 20


def usage_metric(strategy: str) -> str:
    """The budget counter the curves use: `passes` for sampling, `expansions` for best-first."""
    return "passes" if "sampl" in strategy.lower() else "expansions"


def pass_rate_curve(usages: Sequence[int | None], denominator: int) -> list[tuple[int, float]]:
    """Cumulative pass rate: `usages` holds, per proved theorem, the budget it used.

    Returns `(x, fraction of the denominator proved within x)` at each distinct `x`, in
    increasing `x`. `None` entries (unproved) are ignored.
    """
    if denominator <= 0:
        return []
    proved = sorted(u for u in usages if u is not None)
    points: list[tuple[int, float]] = []
    for index, x in enumerate(proved):
        if index + 1 < len(proved) and proved[index + 1] == x:
            continue
        points.append((int(x), (index + 1) / denominator))
    return points


def _usage(record: EvalRecord, metric: str) -> int | None:
    if not record.proved:
        return None
    value = record.result.get(metric, 0)
    return int(value) if value is not None else 0


PASS_AT = (16, 64, 256, 1024, 4096)  # Table 4's columns (1k = 1024, 4k = 4096 passes)


def first_success(record: EvalRecord) -> int | None:
    """The 1-based index of the first pass that found a verified proof (None: unproved)."""
    if not record.proved:
        return None
    index = record.result.get("first_success_pass")
    if index is None:
        index = record.result.get("passes") or 1
    return int(index)


def pass_at(indices: Sequence[int | None], n: int) -> float:
    """Mean of `index <= n` over the theorems (None: never proved): the unbiased pass@n."""
    if not indices:
        return 0.0
    return sum(1 for i in indices if i is not None and i <= n) / len(indices)


def pass_at_from_count(passes: int, successes: int, n: int) -> float:
    """The unbiased pass@n of one theorem from `successes` c among `passes` N independent
    passes: `1 - C(N-c, n) / C(N, n)`, as a product (no huge binomials). n > N: whether any
    pass succeeded (the run cannot say more)."""
    if successes <= 0:
        return 0.0
    if n > passes or passes - successes < n:
        return 1.0
    miss = 1.0
    for i in range(passes - successes + 1, passes + 1):
        miss *= 1.0 - n / i
    return 1.0 - miss


def _theorem_pass_at(record: EvalRecord, n: int) -> float:
    """One record's pass@n estimate: from its success count when the run counted them
    (all_passes), else the first-success indicator."""
    count = record.result.get("successful_passes")
    if count is not None and record.result.get("passes"):
        return pass_at_from_count(int(record.result["passes"]), int(count), n)
    index = first_success(record)
    return 1.0 if index is not None and index <= n else 0.0


def pass_at_points(limit: int) -> list[int]:
    """The n of the pass@n curve up to `limit` passes: powers of 2, Table 4's n, the limit."""
    points = {n for n in PASS_AT if n <= limit} | {limit}
    power = 1
    while power <= limit:
        points.add(power)
        power *= 2
    return sorted(points)


def _row(records: Sequence[EvalRecord], metric: str, usages: Sequence[int | None] | None = None) -> dict[str, Any]:
    n = len(records)
    proved = sum(r.proved for r in records)
    statuses = Counter(r.status for r in records)
    errors = [{"theorem_id": r.theorem_id, "error": r.error or "; ".join(r.result.get("errors", [])[:1])} for r in records if is_infrastructure_error(r)]
    not_replayable = sum(1 for r in records if not_replayable_reason(r) is not None)
    walls = [float(r.result.get("wall_time_s", 0.0)) for r in records]
    used = usages if usages is not None else [_usage(r, metric) for r in records]
    return {
        "theorems": n,
        "proved": proved,
        "pass_rate": proved / n if n else 0.0,
        "status_counts": dict(sorted(statuses.items())),
        "errors": len(errors),
        "not_replayable": not_replayable,
        "failed": n - proved - len(errors) - not_replayable,
        "error_examples": errors[:MAX_LISTED_ERRORS],
        "retried": sum(1 for r in records if r.attempts > 1),
        "wall_time_s_total": sum(walls),
        "wall_time_s_mean": sum(walls) / n if n else 0.0,
        f"{metric}_total": sum(int(r.result.get(metric, 0) or 0) for r in records),
        "compute": {
            key: sum(float(r.result.get(key, 0) or 0) for r in records)
            for key in ("passes", "expansions", "generator_calls", "lean_calls", "wall_time_s", "generator_time_s", "lean_time_s")
        },
        "distinct_trajectories_total": sum(int(r.result.get("distinct_trajectories") or 0) for r in records),
        "curve": [list(p) for p in pass_rate_curve(used, n)],
    }


def summarize(
    records: Iterable[EvalRecord],
    *,
    strategy: str,
    expected: Mapping[str, Collection[str]] | None = None,
    members: Sequence[str] | None = None,
    labels: Mapping[str, str] | None = None,
    baseline: str | None = None,
    passes: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The run's summary (see the module docstring). Pure: depends only on its arguments.

    `expected`: benchmark → ids of the selected theorems. `members`: the member order for
    the rows (defaults to first appearance). `labels`: benchmark → display name.
    `baseline`: the row name of the equal-compute baseline (not an ensemble member).
    `passes`: row → passes per theorem it was given (sampling): pass@n is reported for
    n up to it (the ensemble row: its members' own passes).
    """
    metric = usage_metric(strategy)
    by_bench: dict[str, dict[str, list[EvalRecord]]] = defaultdict(lambda: defaultdict(list))
    order: list[str] = [m for m in members or [] if m != baseline]
    for record in records:
        by_bench[record.benchmark][record.member].append(record)
        if record.member != ENSEMBLE and record.member != baseline and record.member not in order:
            order.append(record.member)
    expected = dict(expected or {})
    benchmarks: dict[str, Any] = {}
    for bench in list(expected) + [b for b in by_bench if b not in expected]:
        rows_in = by_bench.get(bench, {})
        ensemble_records = rows_in.get(ENSEMBLE, [])
        rows: dict[str, Any] = {}
        for member in order:
            if member in rows_in:
                rows[member] = _row(rows_in[member], metric)
        ensemble_members = {m: recs for m, recs in rows_in.items() if m != baseline}
        rows[ENSEMBLE] = _row(ensemble_records, metric, _ensemble_usages(ensemble_records, ensemble_members, metric))
        if baseline is not None and baseline in rows_in:
            rows[baseline] = _row(rows_in[baseline], metric)
            rows[baseline]["baseline"] = True
        if metric == "passes":
            _add_pass_at(rows, rows_in, ensemble_records, baseline, passes or {})
        recorded = len(ensemble_records)
        want = expected.get(bench)
        missing = len(set(want) - {r.theorem_id for r in ensemble_records}) if want is not None else None
        benchmarks[bench] = {
            "label": (labels or {}).get(bench, bench),
            "recorded": recorded,
            "expected": len(want) if want is not None else None,
            "missing": missing,
            "complete": missing == 0,
            "rows": rows,
            # issue 10: how many theorems the replay environment refused, by reason (in the denominator, not errors)
            "replayability": replayability_of_records(ensemble_records, record_message),
        }
    overall_recorded = sum(b["recorded"] for b in benchmarks.values())
    overall_errors = sum(b["rows"][ENSEMBLE]["errors"] for b in benchmarks.values())
    overall_proved = sum(b["rows"][ENSEMBLE]["proved"] for b in benchmarks.values())
    return {
        "strategy": strategy,
        "usage_metric": metric,
        "members": order,
        "benchmarks": benchmarks,
        "recorded": overall_recorded,
        "proved": overall_proved,
        "pass_rate": overall_proved / overall_recorded if overall_recorded else 0.0,
        "errors": overall_errors,
        "baseline": baseline,
        "complete": all(b["complete"] for b in benchmarks.values()) and bool(benchmarks),
    }


def _add_pass_at(
    rows: dict[str, Any],
    rows_in: Mapping[str, Sequence[EvalRecord]],
    ensemble_records: Sequence[EvalRecord],
    baseline: str | None,
    passes: Mapping[str, int],
) -> None:
    """`pass_at` (n → estimate) and `pass_at_limit` on every row (see the module docstring)."""
    by_theorem: dict[str, list[int | None]] = defaultdict(list)
    member_limits = []
    for member, recs in rows_in.items():
        if member == ENSEMBLE:
            continue
        indices = [first_success(r) for r in recs]
        limit = passes.get(member) or max([int(r.result.get("passes") or 0) for r in recs] + [1])
        if member != baseline:
            member_limits.append(limit)
            for r, index in zip(recs, indices):
                by_theorem[r.theorem_id].append(index)
        rows[member]["pass_at_limit"] = limit
        rows[member]["pass_at"] = {
            str(n): (sum(_theorem_pass_at(r, n) for r in recs) / len(recs) if recs else 0.0) for n in pass_at_points(limit)
        }
    if ENSEMBLE in rows:
        if member_limits:
            limit = passes.get(ENSEMBLE) or min(member_limits)
            indices = []
            for r in ensemble_records:
                found = [i for i in by_theorem.get(r.theorem_id, []) if i is not None]
                indices.append(min(found) if found else None)
        else:  # a mixture: the ensemble line is the search
            limit = passes.get(ENSEMBLE) or max([int(r.result.get("passes") or 0) for r in ensemble_records] + [1])
            indices = [first_success(r) for r in ensemble_records]
        rows[ENSEMBLE]["pass_at_limit"] = limit
        rows[ENSEMBLE]["pass_at"] = {str(n): pass_at(indices, n) for n in pass_at_points(limit)}


def _ensemble_usages(
    ensemble_records: Sequence[EvalRecord], rows_in: Mapping[str, Sequence[EvalRecord]], metric: str
) -> list[int | None]:
    per_theorem: dict[str, list[EvalRecord]] = defaultdict(list)
    for member, recs in rows_in.items():
        if member == ENSEMBLE:
            continue
        for r in recs:
            per_theorem[r.theorem_id].append(r)
    usages: list[int | None] = []
    for record in ensemble_records:
        if not record.proved:
            usages.append(None)
            continue
        member_usages = [u for u in (_usage(r, metric) for r in per_theorem.get(record.theorem_id, [])) if u is not None]
        usages.append(min(member_usages) if member_usages else _usage(record, metric))
    return usages


def check_summary_against_records(summary: Mapping[str, Any], records: Sequence[EvalRecord]) -> list[str]:
    """Disagreements between a summary and the records (empty when they agree).

    Recounts, per benchmark and member, the theorems and the proved ones straight from the
    records, independently of `summarize`.
    """
    problems: list[str] = []
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for r in records:
        cell = counts[(r.benchmark, r.member)]
        cell[0] += 1
        cell[1] += int(r.status == "proved")
    seen: set[tuple[str, str]] = set()
    for bench, info in summary.get("benchmarks", {}).items():
        for member, row in info.get("rows", {}).items():
            seen.add((bench, member))
            n, k = counts.get((bench, member), [0, 0])
            if row["theorems"] != n or row["proved"] != k:
                problems.append(f"{bench}/{member}: summary says {row['proved']}/{row['theorems']}, records say {k}/{n}")
    for key in counts:
        if key not in seen:
            problems.append(f"{key[0]}/{key[1]}: in the records but not in the summary")
    return problems
