"""A prover worker: its environments, the members' generators, one theorem at a time.

The same class runs in a thread (local backend) and inside a Ray prover actor. It holds
one environment per environment kind its benchmarks use (a LeanDojo benchmark in replay
or LeanDojo, miniF2F in the REPL), built and entered when the worker is made (a worker
that cannot build them is broken). Per theorem:

- `independent` (default, the paper's Table 2): each member searches the theorem alone,
  with its own full budget; the ensemble line is `combine_independent` of the members
  (proved iff some member proved it);
- `shared`: the same, but the members split one budget (`Budget.split`: passes or
  expansions, and the wall clock), for equal-compute comparisons;
- `union` / `mixture`: one `search` over all members (`search.ensemble`); the member
  lines are the union's per-member records (a union stops the others at the first proof,
  so those lines say `cancelled`), and a mixture has the ensemble line only;
- the equal-compute baseline (`config.baseline`): that member searched once more with
  `factor`× the budget, recorded as its own line (`config.baseline_row`), outside the
  ensemble.

Reproducibility: every search (theorem × member, and the baseline) gets its own seed,
`stream_seed(run seed, theorem id, row name)`, and a generator that can fork its sampling
stream (`fork(seed)`, e.g. the oracle) is forked with it, so no result depends on which
worker ran which theorem in which order. In `independent` and `shared` modes each search
has its own fresh cache: no member sees another's Lean results for free.

A search during which a generator call raised is not a result (see `GeneratorFailure`).
A search whose every Lean call crashed (the environment kept dying past its own restarts)
did not search either: its status becomes `error` with the cause (`crashed_throughout`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from typing import Mapping

from prover.cache import CachingEnvironment
from prover.eval.config import EvalConfig
from prover.eval.records import EvalRecord, combine_independent, records_for_theorem
from search.budget import Budget
from search.result import SearchResult
from search.sampling import stream_seed
from search.types import ProofEnvironment, TacticGenerator, Theorem


CRASH_KINDS = ("env_crash", "env_exception")


def crashed_throughout(result: SearchResult) -> SearchResult:
    """`result`, or (unproved, and every Lean call that reached the environment crashed) the
    same record with status ERROR and the cause first in `errors`: a broken environment
    is an infrastructure error, not a failed search."""
    from search.result import Status

    crashes = sum(result.error_counts.get(kind, 0) for kind in CRASH_KINDS)
    if result.proved or result.status is Status.ERROR or crashes == 0 or crashes < result.cache_misses:
        return result
    first = next((e for e in result.errors if e.split(":", 1)[0] in CRASH_KINDS), "")
    result.status = Status.ERROR
    result.errors.insert(0, f"environment crashed on every one of its {crashes} Lean call(s): {first}")
    return result


def forked(generator: TacticGenerator, seed: int) -> TacticGenerator:
    """The generator with its own sampling stream when it supports `fork(seed)`, else itself
    (a model behind a shared batcher samples from its own global stream)."""
    fork = getattr(generator, "fork", None)
    return fork(seed) if callable(fork) else generator


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
    """Proves theorems with its own environments (entered on construction, exited by `close`).

    `env`: a prebuilt environment used for every benchmark (tests)."""

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
            all_passes=config.all_passes,
        )
        self._fixed_env = env
        self._envs: dict[str, ProofEnvironment] = {}
        if env is not None:
            env.__enter__()
        else:
            for kind in config.env_kinds:  # fail fast: a worker that cannot build its envs is broken
                self._env_for(kind)
        self.theorems_done = 0

    @property
    def env(self) -> ProofEnvironment:
        """The environment of the run's default kind (the prebuilt one when given)."""
        return self._fixed_env if self._fixed_env is not None else self._env_for(self.config.env_kinds[0])

    def _env_for(self, kind: str) -> ProofEnvironment:
        if self._fixed_env is not None:
            return self._fixed_env
        env = self._envs.get(kind)
        if env is None:
            env = replace(self.config.env, kind=kind).build()
            env.__enter__()
            self._envs[kind] = env
        return env

    def _search(self, theorem: Theorem, env: ProofEnvironment, row: str, generator: TacticGenerator, budget: Budget, cancel):
        """One member's own search: its own seed stream and its own cache."""
        from prover.runner import prove

        seed = stream_seed(self.config.generator_options.seed, theorem.id, row)
        settings = replace(self.settings, budget=budget, seed=seed)
        return crashed_throughout(prove(theorem, CachingEnvironment(env), forked(generator, seed), settings, cancel=cancel))

    def prove(self, task: TheoremTask, cancel: threading.Event | None = None) -> list[EvalRecord]:
        """The theorem's complete record group. Search-time failures are in the records;
        an exception here means the worker itself is broken (the backend retries)."""
        from prover.runner import prove

        config = self.config
        theorem = task.theorem
        env = self._env_for(config.env_kind(task.benchmark))
        members: dict[str, SearchResult] = {}
        if config.ensemble in ("independent", "shared"):
            counter = "max_passes" if config.strategy == "sampling" else "max_expansions"
            budgets = config.budget.split(len(self.generators), counter) if config.ensemble == "shared" else [config.budget] * len(self.generators)
            started = time.monotonic()
            for (name, generator), budget in zip(self.generators.items(), budgets):
                if budget is not None:
                    members[name] = self._search(theorem, env, name, generator, budget, cancel)
            ensemble = combine_independent(theorem.id, config.strategy, members)
            if config.ensemble == "shared":
                ensemble.wall_time_s = time.monotonic() - started
        else:
            started = time.monotonic()
            seed = stream_seed(config.generator_options.seed, theorem.id)
            gens = {name: forked(g, stream_seed(seed, name)) for name, g in self.generators.items()}
            ensemble = crashed_throughout(prove(theorem, CachingEnvironment(env), gens, replace(self.settings, seed=seed), cancel=cancel))
            ensemble.wall_time_s = ensemble.wall_time_s or (time.monotonic() - started)
            members = dict(ensemble.members) if config.ensemble == "union" else {}
        lines = dict(members)
        if config.baseline is not None:
            row = config.baseline_row
            assert row is not None
            budget = config.budget.scaled(config.effective_baseline_factor)
            lines[row] = self._search(theorem, env, row, self.generators[config.baseline], budget, cancel)
        for result in [ensemble, *lines.values()]:
            if result.error_counts.get("generator_exception"):
                detail = next((e for e in result.errors if "generator_exception" in e), "generator_exception")
                raise GeneratorFailure(f"{theorem.id}: a generator call failed during the search ({detail})")
        self.theorems_done += 1
        return records_for_theorem(task.benchmark, theorem.id, ensemble, lines, attempts=task.attempt)

    def close(self) -> None:
        if self._fixed_env is not None:
            self._fixed_env.__exit__(None, None, None)
        for env in self._envs.values():
            env.__exit__(None, None, None)
        self._envs.clear()
