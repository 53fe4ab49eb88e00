"""`run_eval`: select theorems, skip finished ones, run a backend, write the reports.

The results file is the single source of truth: the summary, the table and the plots are
recomputed from it after every run (and by `rebuild_reports` on demand), never from
in-memory counters.

Before anything is written, every environment kind the benchmarks need is checked
(`EvalUnavailable`, e.g. miniF2F without Lean: nothing could start). On resume, theorems
whose group ended in an error are searched again (`retry_errors`, the default), and a
selection smaller than what is recorded (a smaller `--limit`) is refused.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from prover.eval.backend import BackendReport
from prover.eval.config import EvalConfig, identity
from prover.eval.records import ENSEMBLE, EvalRecord, is_error_group, not_replayable_reason
from prover.eval.report import table_markdown, write_pass_at_plots, write_plots
from prover.eval.rundir import RunDirectory, RunDirectoryError
from prover.eval.summary import summarize
from prover.eval.worker import TheoremTask
from search.types import TacticGenerator



class EvalUnavailable(RuntimeError):
    """Nothing could start: an environment the benchmarks need cannot run here (the message
    says what is missing and how to get it)."""


def check_environments(config: EvalConfig) -> None:
    """Raise `EvalUnavailable` when an environment kind of the run cannot be built here.
    Lean backends are checked (`prover.runner.make_environment` refuses without Lean);
    replay needs only its data files."""
    from prover.runner import EnvironmentUnavailable, make_environment

    for kind in config.env_kinds:
        if kind == "replay":
            continue
        needs = ", ".join(b.label or b.name for b in config.benchmarks if (b.env or config.env.kind) == kind)
        try:
            make_environment(kind)  # constructed only, not entered: no Lean process starts
        except EnvironmentUnavailable as err:
            raise EvalUnavailable(f"{needs} need(s) the {kind!r} environment, which cannot run here: {err}") from err


@dataclass
class Selection:
    """The theorems of a run, per benchmark, after `limit`; `duplicates` were repeated ids
    in a benchmark file (each kept once, counted here)."""

    tasks: dict[str, list[TheoremTask]]
    duplicates: dict[str, int] = field(default_factory=dict)

    @property
    def expected(self) -> dict[str, list[str]]:
        """benchmark → ids of the selected theorems."""
        return {name: [t.theorem.id for t in tasks] for name, tasks in self.tasks.items()}


def select_theorems(config: EvalConfig) -> Selection:
    tasks: dict[str, list[TheoremTask]] = {}
    duplicates: dict[str, int] = {}
    for bench in config.benchmarks:
        seen: set[str] = set()
        chosen: list[TheoremTask] = []
        for theorem in bench.load():
            if theorem.id in seen:
                duplicates[bench.name] = duplicates.get(bench.name, 0) + 1
                continue
            seen.add(theorem.id)
            chosen.append(TheoremTask(bench.name, theorem))
        tasks[bench.name] = chosen[: config.limit] if config.limit is not None else chosen
    return Selection(tasks, duplicates)


@dataclass
class EvalOutcome:
    """What a run did: `new_theorems` recorded now, `skipped` already recorded before."""

    run_dir: Path
    summary: dict[str, Any]
    report: BackendReport
    new_theorems: int
    skipped: int
    dropped_torn_lines: int
    elapsed_s: float
    plots: list[Path]

    def final_line(self) -> str:
        return final_line(self.summary)


def final_line(summary: Mapping[str, Any]) -> str:
    parts = []
    for info in summary["benchmarks"].values():
        row = info["rows"][ENSEMBLE]
        errors = f" ({row['errors']} error(s))" if row.get("errors") else ""
        parts.append(f"{info['label']} {row['proved']}/{row['theorems']} = {100.0 * row['pass_rate']:.1f}%{errors}")
    status = "" if summary["complete"] else " (incomplete)"
    return "pass rate (ensemble): " + "; ".join(parts) + status


def _normalised(config: EvalConfig) -> dict[str, Any]:
    return json.loads(json.dumps(config.to_json()))


def choose_backend(config: EvalConfig, *, generators: Mapping[str, TacticGenerator] | None = None, on_dispatch=None):
    """Ray when asked for (and installed), else the local backend."""
    if config.distribution.use_ray:
        from prover.eval.ray_backend import RayBackend

        if generators is not None:
            raise ValueError("prebuilt generators only work with the local backend")
        return RayBackend(config, on_dispatch=on_dispatch)
    from prover.eval.local_backend import LocalBackend

    return LocalBackend(config, generators=generators)


def run_eval(
    config: EvalConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    backend=None,
    generators: Mapping[str, TacticGenerator] | None = None,
    on_dispatch=None,
    progress: bool = False,
    on_group: Callable[[list[EvalRecord]], None] | None = None,
    retry_errors: bool = True,
) -> EvalOutcome:
    """Evaluate `config` into `run_dir` (see the module docstring).

    `resume`: continue an existing run (same identity), skipping recorded theorems; with
    `retry_errors` the theorems recorded as errors are searched again.
    `backend`: an object with `run(tasks, sink)`; chosen from the config when None.
    `progress`: show a rich progress bar on stderr.
    """
    started = time.monotonic()
    config_json = _normalised(config)
    selection = select_theorems(config)
    if backend is None and generators is None:
        check_environments(config)
    stored = dict(config_json, expected={name: len(ids) for name, ids in selection.expected.items()}, duplicates=selection.duplicates)
    retried = 0
    if resume:
        run, loaded = RunDirectory.open_for_resume(run_dir, identity(config_json), identity)
        try:
            selected = {t.key for tasks in selection.tasks.values() for t in tasks}
            beyond = sorted({r.key for r in loaded.records} - selected)
            if beyond:
                raise RunDirectoryError(
                    f"{run.path} already records {len(beyond)} theorem(s) outside this selection (e.g. {beyond[0][1]!r} of "
                    f"{beyond[0][0]}): a smaller --limit cannot shrink a run; resume with the same --limit (or none), "
                    "or choose another --run-dir"
                )
            if retry_errors:
                groups: dict[tuple[str, str], list[EvalRecord]] = {}
                for record in loaded.records:
                    groups.setdefault(record.key, []).append(record)
                errored = {key for key, group in groups.items() if is_error_group(group)}
                retried = len(errored)
                run.drop_groups(errored)
                loaded_keys = set(groups) - errored
            else:
                loaded_keys = {r.key for r in loaded.records}
            run.update_config(stored)
        except BaseException:
            run.close()
            raise
        done = loaded_keys
        dropped = loaded.dropped_lines
    else:
        run = RunDirectory.create(run_dir, stored)
        done, dropped = set(), 0
    try:
        todo = [t for tasks in selection.tasks.values() for t in tasks if t.key not in done]
        skipped = sum(len(tasks) for tasks in selection.tasks.values()) - len(todo)
        if backend is None:
            backend = choose_backend(config, generators=generators, on_dispatch=on_dispatch)
        with _Progress(len(todo), skipped, enabled=progress) as bar:

            def sink(group: list[EvalRecord]) -> None:
                run.append_group(group)
                bar.advance("not_replayable" if not_replayable_reason(group[-1]) else group[-1].status)
                if on_group is not None:
                    on_group(group)

            report = backend.run(todo, sink) if todo else BackendReport("none", 0)
        elapsed = time.monotonic() - started
        summary, plots = rebuild_reports(run, config, selection.expected, extra={"last_invocation": {
            **report.to_json(),
            "new_theorems": len(todo),
            "skipped_already_recorded": skipped,
            "dropped_torn_lines": dropped,
            "elapsed_s": elapsed,
            "theorems_per_s": len(todo) / elapsed if elapsed > 0 else 0.0,
            "retried_errors": retried,
        }, "duplicate_ids_skipped": selection.duplicates})
    finally:
        run.close()
    return EvalOutcome(Path(run_dir), summary, report, len(todo), skipped, dropped, elapsed, plots)


def rebuild_reports(
    run: RunDirectory, config: EvalConfig, expected: Mapping[str, Sequence[str]], *, extra: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], list[Path]]:
    """summary.json, table.md and plots/ recomputed from results.jsonl."""
    records = run.records()
    summary = summarize(
        records,
        strategy=config.strategy,
        expected=expected,
        members=config.member_names if config.ensemble != "mixture" else [],
        labels={b.name: b.label for b in config.benchmarks},
        baseline=config.baseline_row,
        passes=row_passes(config),
    )
    summary["budget"] = config.budget.to_json()
    summary["ensemble_mode"] = config.ensemble
    summary.update(extra or {})
    run.write_summary(summary)
    run.write_table(table_markdown(summary, budget=config.budget.to_json(), ensemble=config.ensemble, title=f"Evaluation: {run.path.name}"))
    plots = write_plots(summary, run.plots_path) + write_pass_at_plots(summary, run.plots_path, config.ensemble)
    return summary, plots


def row_passes(config: EvalConfig) -> dict[str, int]:
    """Passes per theorem each row was given (pass@n is reported up to it): every member
    its own budget (`shared`: its share), the ensemble what each member had (`shared`: the
    smallest share), the baseline `factor`× the budget."""
    budget = config.budget.max_passes
    if config.ensemble == "shared":
        parts = config.budget.split(len(config.members), "max_passes")
        passes = {m.name: b.max_passes for m, b in zip(config.members, parts) if b is not None}
        passes[ENSEMBLE] = min(passes.values())
    else:
        passes = {name: budget for name in config.member_names}
        passes[ENSEMBLE] = budget
    if config.baseline_row is not None:
        passes[config.baseline_row] = budget * config.effective_baseline_factor
    return passes


class _Progress:
    """A rich progress bar (stderr) with proved / failed counts and an ETA; no-op when disabled."""

    def __init__(self, total: int, skipped: int, *, enabled: bool) -> None:
        self.total = total
        self.skipped = skipped
        self.enabled = enabled and total > 0
        self.proved = 0
        self.failed = 0
        self.errors = 0
        self._progress = None
        self._task = None

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]eval"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("[green]proved {task.fields[proved]}[/] [red]failed {task.fields[failed]}[/] [yellow]errors {task.fields[errors]}[/]"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._progress.__enter__()
            if self.skipped:
                self._progress.console.print(f"resuming: {self.skipped} theorem(s) already recorded, {self.total} to go")
            self._task = self._progress.add_task("eval", total=self.total, proved=0, failed=0, errors=0)
        return self

    def advance(self, status: str) -> None:
        """One theorem recorded with the ensemble line's `status`."""
        if status == "proved":
            self.proved += 1
        elif status == "error":
            self.errors += 1
        else:
            self.failed += 1
        if self._progress is not None:
            self._progress.update(self._task, advance=1, proved=self.proved, failed=self.failed, errors=self.errors)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
