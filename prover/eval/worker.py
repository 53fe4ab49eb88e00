"""A prover worker: one environment, the members' generators, one theorem at a time.

The same class runs in a thread (local backend) and inside a Ray prover actor. Per theorem
it wraps its environment in a fresh `CachingEnvironment` (so results never depend on which
theorems a worker saw before) that every member of the theorem shares, then:

- `independent` (default, the paper's Table 2): each member searches the theorem alone,
  with its own full budget; the ensemble line is `combine_independent` of the members
  (proved iff some member proved it);
- `union` / `mixture`: one `search` over all members (`search.ensemble`); the member
  lines are the union's per-member records (a union stops the others at the first proof,
  so those lines say `cancelled`), and a mixture has the ensemble line only.

A search during which a generator call raised is not a result (see `GeneratorFailure`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Mapping

from prover.cache import CachingEnvironment
from prover.eval.config import EvalConfig
from prover.eval.records import EvalRecord, combine_independent, records_for_theorem
from search.result import SearchResult
from search.types import ProofEnvironment, TacticGenerator, Theorem


class GeneratorFailure(RuntimeError):
    """A generator call raised during a search (the search went on without candidates).

    Such a search did not really search, so its outcome is not recorded as a failure: the
    worker raises this instead and the backend retries the theorem (then records an error).
    """


@dataclass(frozen=True)
class TheoremTask:
    """One theorem of one benchmark; `attempt` counts dispatches (1 for the first)."""

    benchmark: str
    theorem: Theorem
    attempt: int = 1

    @property
    def key(self) -> tuple[str, str]:
        return (self.benchmark, self.theorem.id)


class ProverWorker:
    """Proves theorems with its own environment (entered on construction, exited by `close`)."""

    def __init__(self, config: EvalConfig, generators: Mapping[str, TacticGenerator], env: ProofEnvironment | None = None) -> None:
        from prover.runner import ProveSettings

        missing = [name for name in config.member_names if name not in generators]
        if missing:
            raise ValueError(f"no generator for member(s) {', '.join(missing)}")
        self.config = config
        self.generators = {name: generators[name] for name in config.member_names}
        self.settings = ProveSettings(
            strategy=config.strategy,
            budget=config.budget,
            ensemble_mode="mixture" if config.ensemble == "mixture" else "union",
            length_alpha=config.length_alpha,
            samples_per_step=config.samples_per_step,
            parallel_passes=config.parallel_passes,
            seed=config.generator_options.seed,
            env=config.env.kind,
            cache=True,
        )
        self.env = env if env is not None else config.env.build()
        self.env.__enter__()
        self.theorems_done = 0

    def prove(self, task: TheoremTask, cancel: threading.Event | None = None) -> list[EvalRecord]:
        """The theorem's complete record group. Search-time failures are in the records;
        an exception here means the worker itself is broken (the backend retries)."""
        from prover.runner import prove

        theorem = task.theorem
        cache = CachingEnvironment(self.env)
        if self.config.ensemble == "independent":
            members: dict[str, SearchResult] = {}
            for name, generator in self.generators.items():
                members[name] = prove(theorem, cache, generator, self.settings, cancel=cancel)
            ensemble = combine_independent(theorem.id, self.config.strategy, members)
        else:
            started = time.monotonic()
            ensemble = prove(theorem, cache, dict(self.generators), self.settings, cancel=cancel)
            ensemble.wall_time_s = ensemble.wall_time_s or (time.monotonic() - started)
            members = dict(ensemble.members) if self.config.ensemble == "union" else {}
        for result in [ensemble, *members.values()]:
            if result.error_counts.get("generator_exception"):
                detail = next((e for e in result.errors if "generator_exception" in e), "generator_exception")
                raise GeneratorFailure(f"{theorem.id}: a generator call failed during the search ({detail})")
        self.theorems_done += 1
        return records_for_theorem(task.benchmark, theorem.id, ensemble, members, attempts=task.attempt)

    def close(self) -> None:
        self.env.__exit__(None, None, None)
