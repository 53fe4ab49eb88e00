"""Evaluation records: one JSON line per theorem per ensemble member, plus one for the ensemble.

A theorem's records form a *group* written in one append: its member lines first, the
`ENSEMBLE` line last, each carrying `group_size` (the number of lines in the group). A
group is complete iff all `group_size` lines are present; anything less is the tail of an
interrupted write and is discarded on resume (see `rundir`).

Invariants:
- every selected theorem ends with exactly one complete group per benchmark;
- a theorem whose environment failed to start (or that exhausted its retries) still has a
  group, with `status == "error"` and the reason in `error`: the denominator never shrinks;
- `proved` is true iff `status == "proved"` (a verified proof).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from search.result import SearchResult, Status

RECORD_VERSION = 1
ENSEMBLE = "ensemble"


@dataclass(frozen=True)
class EvalRecord:
    """The outcome of one theorem for one member (or `ENSEMBLE`).

    `result` is the `SearchResult.to_json()` of that member's search (the ensemble line's
    result has its `members` emptied: the member lines carry them). `attempts` counts how
    many times the theorem was dispatched (retries after a crashed worker included).
    """

    benchmark: str
    theorem_id: str
    member: str
    status: str
    proved: bool
    group_size: int
    attempts: int = 1
    error: str | None = None
    result: dict[str, Any] = field(default_factory=dict)
    version: int = RECORD_VERSION

    def __post_init__(self) -> None:
        if not self.benchmark or not self.theorem_id or not self.member:
            raise ValueError(f"record needs a benchmark, theorem id and member, got {self.key!r}/{self.member!r}")
        Status(self.status)  # raises ValueError on an unknown status
        if self.proved != (self.status == Status.PROVED.value):
            raise ValueError(f"record {self.key}/{self.member}: proved={self.proved} contradicts status={self.status!r}")
        if self.group_size < 1:
            raise ValueError(f"record {self.key}/{self.member}: group_size must be >= 1, got {self.group_size}")

    @property
    def key(self) -> tuple[str, str]:
        """(benchmark, theorem id): the unit of resume."""
        return (self.benchmark, self.theorem_id)

    def search_result(self) -> SearchResult:
        return SearchResult.from_json(self.result)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> "EvalRecord":
        data = dict(record)
        version = data.get("version", RECORD_VERSION)
        if version != RECORD_VERSION:
            raise ValueError(f"record version {version!r} is not supported (expected {RECORD_VERSION})")
        missing = [name for name in ("benchmark", "theorem_id", "member", "status", "proved", "group_size") if name not in data]
        if missing:
            raise ValueError(f"record lacks field(s) {', '.join(missing)}: {str(dict(record))[:200]}")
        return cls(**data)


def error_result(theorem_id: str, strategy: str, message: str, member: str | None = None) -> SearchResult:
    """A `SearchResult` for a theorem that could not be searched (start failure, lost worker)."""
    return SearchResult(theorem_id=theorem_id, status=Status.ERROR, strategy=strategy, member=member, errors=[message])


def combine_independent(theorem_id: str, strategy: str, members: Mapping[str, SearchResult]) -> SearchResult:
    """The ensemble outcome of members searched independently, each with its own budget.

    This is the paper's Table-2 ensemble: proved iff some member proved it (the first
    member in order that did supplies the proof and `member`). Counters (passes,
    expansions, Lean calls, times) are sums over members: the compute the ensemble spent.
    Status when unproved: `error` if any member errored (an infrastructure error: the
    ensemble did not really search with all its members, so it is not a failure and a
    resumed run retries it), else `timeout` if any member timed out, else
    `budget_exhausted` if any member ran out of budget, else `failed` (every member
    exhausted its search space).
    """
    if not members:
        raise ValueError(f"theorem {theorem_id!r}: an ensemble needs at least one member result")
    results = list(members.items())
    winner = next(((name, r) for name, r in results if r.proved), None)
    statuses = {r.status for _, r in results}
    if winner is not None:
        status = Status.PROVED
    elif Status.ERROR in statuses:
        status = Status.ERROR
    elif Status.TIMEOUT in statuses:
        status = Status.TIMEOUT
    elif Status.BUDGET_EXHAUSTED in statuses:
        status = Status.BUDGET_EXHAUSTED
    else:
        status = Status.FAILED
    combined = SearchResult(theorem_id=theorem_id, status=status, strategy=strategy)
    if winner is not None:
        name, found = winner
        combined.proof = list(found.proof or [])
        combined.verified = found.verified
        combined.verification_message = found.verification_message
        combined.member = name
        combined.proof_members = [name] * len(combined.proof)
    for name, r in results:
        combined.add_counts(r)
    # The causes of errored members first, so the ensemble line's `error` names them.
    for name, r in sorted(results, key=lambda item: item[1].status is not Status.ERROR):
        combined.errors.extend(f"{name}: {e}" for e in r.errors)
    return combined


def record_message(record: EvalRecord) -> str:
    """The record's error, else its search's error log joined (empty when neither)."""
    return record.error or "; ".join(record.result.get("errors", []))


def not_replayable_reason(record: EvalRecord) -> str | None:
    """The category when the record's theorem was refused by the replay environment as not
    replayable (a property of the data, `prover.replayability`), else None.

    Such a record has status `error` (nothing was searched) but is no infrastructure error:
    it stays in every denominator as not proved, in its own `not_replayable` count, and is
    neither retried on resume nor a reason for a non-zero exit."""
    if record.status != Status.ERROR.value:
        return None
    from prover.replayability import reason_in_message

    return reason_in_message(record_message(record))


def is_infrastructure_error(record: EvalRecord) -> bool:
    """`error` status for a reason other than the theorem being not replayable."""
    return record.status == Status.ERROR.value and not_replayable_reason(record) is None


def is_error_group(group: Sequence[EvalRecord]) -> bool:
    """Whether a theorem's group ended in an infrastructure error (its ensemble line); a
    theorem refused as not replayable is not one (searching it again changes nothing)."""
    return any(r.member == ENSEMBLE and is_infrastructure_error(r) for r in group)


def records_for_theorem(
    benchmark: str,
    theorem_id: str,
    ensemble_result: SearchResult,
    member_results: Mapping[str, SearchResult],
    *,
    attempts: int = 1,
    error: str | None = None,
) -> list[EvalRecord]:
    """The complete group of one theorem: member lines (in the given order), ensemble last."""
    group_size = len(member_results) + 1
    records: list[EvalRecord] = []
    for name, result in member_results.items():
        if name == ENSEMBLE:
            raise ValueError(f"{ENSEMBLE!r} is reserved for the ensemble line; rename that member")
        records.append(_record(benchmark, theorem_id, name, result, group_size, attempts, error))
    ensemble_only = SearchResult.from_json({**ensemble_result.to_json(), "members": {}})
    records.append(_record(benchmark, theorem_id, ENSEMBLE, ensemble_only, group_size, attempts, error))
    return records


def error_group(
    benchmark: str,
    theorem_id: str,
    strategy: str,
    member_names: Sequence[str],
    message: str,
    *,
    attempts: int,
) -> list[EvalRecord]:
    """The group of a theorem that produced no search result (e.g. its worker kept dying)."""
    members = {name: error_result(theorem_id, strategy, message, name) for name in member_names}
    return records_for_theorem(
        benchmark, theorem_id, error_result(theorem_id, strategy, message), members, attempts=attempts, error=message
    )


def _record(
    benchmark: str, theorem_id: str, member: str, result: SearchResult, group_size: int, attempts: int, error: str | None
) -> EvalRecord:
    if result.theorem_id != theorem_id:
        raise ValueError(f"result of {result.theorem_id!r} filed under theorem {theorem_id!r}")
    if error is None and result.status is Status.ERROR and result.errors:
        error = result.errors[0]
    return EvalRecord(
        benchmark=benchmark,
        theorem_id=theorem_id,
        member=member,
        status=result.status.value,
        proved=result.proved,
        group_size=group_size,
        attempts=attempts,
        error=error,
        result=result.to_json(),
    )
