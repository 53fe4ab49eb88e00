"""The run directory of one evaluation: config, append-only results, summary, reports.

Layout:
- `config.json`: the evaluation's settings (`EvalConfig.to_json()`), written once; a
  resumed run must present the same *identity* (benchmarks, generators, environment,
  strategy, budget), or it is refused.
- `results.jsonl`: `EvalRecord` lines. Each theorem's group is one `os.write` on an
  `O_APPEND` descriptor followed by `fsync`, so a killed run loses at most the theorems
  in flight; a torn tail (partial line or partial group) is cut off by `open_for_resume`.
- `summary.json`, `table.md`, `plots/*.png`: derived from `results.jsonl` only.
- `retried_errors.jsonl`: the error groups a resumed run took out of `results.jsonl` to
  search those theorems again (kept for the record; never read back).

Only one process writes a run directory at a time (the evaluation driver); a lock file
(`.lock`, holding the writer's pid) refuses a second writer.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from prover.eval.records import ENSEMBLE, EvalRecord

CONFIG = "config.json"
RESULTS = "results.jsonl"
SUMMARY = "summary.json"
TABLE = "table.md"
PLOTS = "plots"
LOCK = ".lock"
RETRIED = "retried_errors.jsonl"


class RunDirectoryError(Exception):
    """The run directory cannot be used as asked (exists without --resume, config mismatch, corrupt results)."""


@dataclass(frozen=True)
class LoadReport:
    """What `load_records` found. `dropped_lines` were cut off as the torn tail of a crash."""

    records: list[EvalRecord]
    dropped_lines: int
    dropped_bytes: int
    complete_theorems: int


def parse_results(data: bytes, *, source: str = RESULTS) -> LoadReport:
    """Parse `results.jsonl` content, dropping only a torn tail.

    A torn tail is: bytes after the last newline (a partial line), then any trailing
    groups that lack some of their `group_size` lines. A malformed line elsewhere, an
    incomplete group followed by complete ones, or a theorem recorded twice is corruption
    and raises `RunDirectoryError` (nothing is silently dropped from the middle).
    """
    end = data.rfind(b"\n") + 1
    partial_bytes = len(data) - end
    lines = data[:end].split(b"\n")[:-1]
    parsed: list[EvalRecord] = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            raise RunDirectoryError(f"{source}: line {number} is empty")
        try:
            parsed.append(EvalRecord.from_json(json.loads(raw)))
        except (ValueError, TypeError) as err:
            raise RunDirectoryError(f"{source}: line {number} is not a valid record: {err}") from err

    groups: list[list[EvalRecord]] = []
    for record in parsed:
        current = groups[-1] if groups else None
        if current is not None and current[0].key == record.key and len(current) < current[0].group_size and current[-1].member != ENSEMBLE:
            current.append(record)
        else:
            groups.append([record])

    complete: list[list[EvalRecord]] = []
    torn_from: int | None = None
    for index, group in enumerate(groups):
        ok = len(group) == group[0].group_size and group[-1].member == ENSEMBLE and all(r.group_size == group[0].group_size for r in group)
        if ok and torn_from is None:
            complete.append(group)
        elif not ok and torn_from is None:
            torn_from = index
        elif ok:  # a complete group after an incomplete one: not a torn tail
            bad = groups[torn_from][0]
            raise RunDirectoryError(
                f"{source}: the group of theorem {bad.theorem_id!r} ({bad.benchmark}) is incomplete but is followed by "
                "complete groups; the file was edited or written by two processes"
            )
    dropped_lines = sum(len(g) for g in groups[torn_from:]) if torn_from is not None else 0

    seen: set[tuple[str, str]] = set()
    records: list[EvalRecord] = []
    for group in complete:
        key = group[0].key
        if key in seen:
            raise RunDirectoryError(f"{source}: theorem {key[1]!r} of benchmark {key[0]!r} is recorded twice")
        members = [r.member for r in group]
        if len(set(members)) != len(members):
            raise RunDirectoryError(f"{source}: theorem {key[1]!r} has a repeated member line: {members}")
        seen.add(key)
        records.extend(group)
    dropped_bytes = partial_bytes + sum(len(raw) + 1 for raw in lines[len(lines) - dropped_lines :]) if dropped_lines else partial_bytes
    return LoadReport(records, dropped_lines + (1 if partial_bytes else 0), dropped_bytes, len(complete))


class RunDirectory:
    """A run directory (see the module docstring). Use `create` or `open_for_resume`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._locked = False

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def results_path(self) -> Path:
        return self.path / RESULTS

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY

    @property
    def table_path(self) -> Path:
        return self.path / TABLE

    @property
    def plots_path(self) -> Path:
        return self.path / PLOTS

    # ------------------------------------------------------------- opening

    @classmethod
    def create(cls, path: str | Path, config: Mapping[str, Any]) -> "RunDirectory":
        """A new run directory; refuses one that already holds results or a config."""
        run = cls(Path(path))
        if run.config_path.exists() or run.results_path.exists():
            raise RunDirectoryError(f"{run.path} already holds an evaluation; pass --resume to continue it or choose another --run-dir")
        run.path.mkdir(parents=True, exist_ok=True)
        run._lock()
        try:
            _atomic_write(run.config_path, json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
            run.results_path.touch()
        except BaseException:
            run.close()
            raise
        return run

    @classmethod
    def open_for_resume(cls, path: str | Path, identity: Mapping[str, Any], identity_of) -> tuple["RunDirectory", LoadReport]:
        """Open an existing run, check its config's identity and repair a torn results tail.

        `identity_of(config_json) -> mapping` extracts the identity from the stored config.
        """
        run = cls(Path(path))
        if not run.config_path.exists():
            raise RunDirectoryError(f"{run.path} has no {CONFIG}: nothing to resume (drop --resume to start a new run)")
        run._lock()
        try:
            stored = run.read_config()
            stored_identity = identity_of(stored)
            if dict(stored_identity) != dict(identity):
                diffs = sorted(k for k in set(stored_identity) | set(identity) if stored_identity.get(k) != identity.get(k))
                raise RunDirectoryError(
                    f"{run.path} was started with different settings ({', '.join(diffs)}); resume it with the same "
                    "benchmarks, generators, environment, strategy and budget, or choose another --run-dir"
                )
            report = run.load()
            if report.dropped_bytes:
                run._truncate_to_complete(report)
        except BaseException:
            run.close()
            raise
        return run, report

    def read_config(self) -> dict[str, Any]:
        try:
            return json.loads(self.config_path.read_text())
        except (OSError, ValueError) as err:
            raise RunDirectoryError(f"cannot read {self.config_path}: {err}") from err

    def update_config(self, config: Mapping[str, Any]) -> None:
        """Rewrite config.json (e.g. the distribution settings of a resumed run)."""
        _atomic_write(self.config_path, json.dumps(dict(config), indent=2, sort_keys=True) + "\n")

    def load(self) -> LoadReport:
        data = self.results_path.read_bytes() if self.results_path.exists() else b""
        return parse_results(data, source=str(self.results_path))

    def records(self) -> list[EvalRecord]:
        return self.load().records

    def _truncate_to_complete(self, report: LoadReport) -> None:
        size = self.results_path.stat().st_size
        with open(self.results_path, "r+b") as handle:
            handle.truncate(size - report.dropped_bytes)
            handle.flush()
            os.fsync(handle.fileno())

    def drop_groups(self, keys: set[tuple[str, str]]) -> int:
        """Take the groups of `keys` out of results.jsonl (to be searched again), appending
        them to `retried_errors.jsonl` first; the rewrite is atomic. Returns the lines moved."""
        if not keys:
            return 0
        records = self.records()
        moved = [r for r in records if r.key in keys]
        kept = [r for r in records if r.key not in keys]
        if not moved:
            return 0
        with open(self.path / RETRIED, "ab") as handle:
            handle.write(b"".join(json.dumps(r.to_json(), sort_keys=True).encode() + b"\n" for r in moved))
            handle.flush()
            os.fsync(handle.fileno())
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        _atomic_write(self.results_path, "".join(json.dumps(r.to_json(), sort_keys=True) + "\n" for r in kept))
        return len(moved)

    # ------------------------------------------------------------- writing

    def append_group(self, records: Iterable[EvalRecord]) -> None:
        """Append one theorem's complete group durably: one write, then fsync."""
        group = list(records)
        if not group or group[-1].member != ENSEMBLE or len(group) != group[0].group_size:
            raise ValueError("append_group needs one complete group (members then the ensemble line)")
        payload = b"".join(json.dumps(r.to_json(), sort_keys=True).encode() + b"\n" for r in group)
        if self._fd is None:
            self._fd = os.open(self.results_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        view = memoryview(payload)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        _atomic_write(self.summary_path, json.dumps(dict(summary), indent=2, sort_keys=True) + "\n")

    def write_table(self, markdown: str) -> None:
        _atomic_write(self.table_path, markdown)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._locked:
            try:
                (self.path / LOCK).unlink()
            except FileNotFoundError:
                pass
            self._locked = False

    def __enter__(self) -> "RunDirectory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------- locking

    def _lock(self) -> None:
        lock = self.path / LOCK
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    pid = int(lock.read_text().strip() or "0")
                except (OSError, ValueError):
                    pid = 0
                if pid and _alive(pid):
                    raise RunDirectoryError(f"{self.path} is being written by process {pid}; wait for it or stop it first")
                lock.unlink(missing_ok=True)  # stale lock of a dead process
                continue
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            self._locked = True
            return
        raise RunDirectoryError(f"cannot take the lock {lock}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except OSError as err:
        return err.errno == errno.EPERM
    return True


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
