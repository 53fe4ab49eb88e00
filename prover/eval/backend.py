"""What the local and Ray backends share: the result sink, retries, and the run report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from prover.eval.config import EvalConfig
from prover.eval.records import EvalRecord, error_group
from prover.eval.worker import TheoremTask

GroupSink = Callable[[list[EvalRecord]], None]
"""Called on the driver's thread with each theorem's complete record group, as it finishes."""


@dataclass
class BackendReport:
    """What happened on the way. `worker_failures`: tries lost to a dead/raising/hung worker;
    `workers_replaced`: workers rebuilt after one; `gave_up`: theorems recorded as errors
    after `max_retries` retries; `batching`: per member, the batcher's counters."""

    backend: str
    workers: int
    worker_failures: int = 0
    workers_replaced: int = 0
    gave_up: list[str] = field(default_factory=list)
    failure_messages: list[str] = field(default_factory=list)
    batching: dict[str, dict] = field(default_factory=dict)
    serving_s: float = 0.0  # seconds from the first theorem handed to a worker to the last result


    def to_json(self) -> dict:
        return {
            "backend": self.backend,
            "workers": self.workers,
            "worker_failures": self.worker_failures,
            "workers_replaced": self.workers_replaced,
            "gave_up": list(self.gave_up),
            "failure_messages": self.failure_messages[:20],
            "batching": self.batching,
            "serving_s": self.serving_s,
        }


class Backend(Protocol):
    def run(self, tasks: Sequence[TheoremTask], sink: GroupSink) -> BackendReport: ...


def after_failure(
    task: TheoremTask, message: str, config: EvalConfig, report: BackendReport
) -> tuple[TheoremTask | None, list[EvalRecord] | None]:
    """A try of `task` failed: the retry to queue, or (retries spent) its error group."""
    report.worker_failures += 1
    if len(report.failure_messages) < 100:
        report.failure_messages.append(f"{task.theorem.id} (try {task.attempt}): {message}")
    if task.attempt <= config.distribution.max_retries:
        return TheoremTask(task.benchmark, task.theorem, task.attempt + 1), None
    report.gave_up.append(task.theorem.id)
    text = f"worker failed {task.attempt} time(s) on this theorem; last failure: {message}"
    members = config.member_names if config.ensemble != "mixture" else []  # a mixture has no member lines
    return None, error_group(task.benchmark, task.theorem.id, config.strategy, members, text, attempts=task.attempt)
