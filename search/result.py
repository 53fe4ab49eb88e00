"""The search result record: one JSON object per theorem (per member and for the ensemble)."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any


class Status(str, enum.Enum):
    PROVED = "proved"  # a proof was found and verified
    FAILED = "failed"  # the search space was exhausted (every node failed) without a proof
    BUDGET_EXHAUSTED = "budget_exhausted"  # expansions/passes used up
    TIMEOUT = "timeout"  # wall-clock limit reached
    ERROR = "error"  # the environment could not start, the generation layer failed (cause in errors), or another unrecoverable error
    CANCELLED = "cancelled"  # stopped from outside (a cancel event, or another union member proved it)


@dataclass
class SearchResult:
    """Everything a user needs about one search. Times are wall-clock seconds.

    Invariant: `status == PROVED` iff `proof is not None and verified`. A proof found but
    rejected by verification is reported with `status=FAILED`, `proof` set, `verified=False`
    and the reason in `verification_message`.
    """

    theorem_id: str
    status: Status
    strategy: str
    proof: list[str] | None = None
    verified: bool = False
    verification_message: str = ""
    member: str | None = None  # which generator (ensemble member) found the proof / ran this search
    passes: int = 0
    expansions: int = 0
    lean_calls: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    generator_calls: int = 0
    generator_time_s: float = 0.0
    lean_time_s: float = 0.0
    wall_time_s: float = 0.0
    max_depth_reached: int = 0
    errors: list[str] = field(default_factory=list)  # first messages only; see error_counts
    error_counts: dict[str, int] = field(default_factory=dict)  # every recorded error, by kind
    dropped_candidates: dict[str, int] = field(default_factory=dict)  # empty/duplicate/forbidden/invalid
    proof_members: list[str] | None = None  # per proof step, the member whose candidate it was
    # sampling: distinct tactic sequences the passes tried (a deterministic generator makes
    # every pass the same: 1), and the 1-based index of the lowest-numbered pass that found a
    # verified proof (pass@n of this run is `first_success_pass <= n`; None: no proof).
    distinct_trajectories: int | None = None
    first_success_pass: int | None = None
    successful_passes: int | None = None  # sampling with all_passes: passes that found a verified proof
    members: dict[str, "SearchResult"] = field(default_factory=dict)  # ensemble: per member

    @property
    def proved(self) -> bool:
        return self.status is Status.PROVED

    def add_counts(self, other: "SearchResult", *, wall_time: bool = True) -> None:
        """Add `other`'s work counters into this record (an ensemble's total over members):
        passes, expansions, Lean and generator calls and times, cache counts, error and
        dropped-candidate counts; `max_depth_reached` is the maximum. Wall time is added
        only with `wall_time` (members run one after another); messages are not copied."""
        self.passes += other.passes
        self.expansions += other.expansions
        self.lean_calls += other.lean_calls
        self.cache_hits += other.cache_hits
        self.cache_misses += other.cache_misses
        self.generator_calls += other.generator_calls
        self.generator_time_s += other.generator_time_s
        self.lean_time_s += other.lean_time_s
        if wall_time:
            self.wall_time_s += other.wall_time_s
        self.max_depth_reached = max(self.max_depth_reached, other.max_depth_reached)
        if other.distinct_trajectories is not None:
            self.distinct_trajectories = (self.distinct_trajectories or 0) + other.distinct_trajectories
        for kind, count in other.error_counts.items():
            self.error_counts[kind] = self.error_counts.get(kind, 0) + count
        for reason, count in other.dropped_candidates.items():
            self.dropped_candidates[reason] = self.dropped_candidates.get(reason, 0) + count

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["status"] = self.status.value
        record["members"] = {name: r.to_json() for name, r in self.members.items()}
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> "SearchResult":
        data = dict(record)
        data["status"] = Status(data["status"])
        data["members"] = {k: cls.from_json(v) for k, v in data.get("members", {}).items()}
        return cls(**data)
