"""The one entry point of the search: `search(theorem, env, generators, ...)`.

Used by the prover's runner, the CLI, the service and the evaluation. The caller owns the
environment's lifecycle (enter its context manager before, exit after); `search` only calls
`start`, `apply` and `verify`. Starting the environment is part of the search: a failure
(`EnvironmentStartError` or any exception) gives a record with status ERROR and the
message, never an exception.

Hooks
- `progress(payload)`: called after every expansion (best-first) or every round in which
  a pass ended (sampling), with at least `strategy`, `expansions` or `passes`,
  `max_depth`, `lean_calls` and `elapsed_s` (seconds, on the member's clock for unions,
  where `member` is added). Its exceptions are recorded in the result, never raised.
- `cancel`: a `threading.Event` checked wherever the deadline is (before every generator
  and environment call); once set, the search returns status CANCELLED.
"""

from __future__ import annotations

import threading
from typing import Callable, Literal, Mapping

from search.best_first import best_first_search, check_length_alpha
from search.budget import Budget
from search.ensemble import STRATEGIES, mixture, shared, union
from search.result import SearchResult
from search.sampling import check_sampling_args, sampling_search
from search.tactic_filter import TacticFilter
from search.types import ProofEnvironment, TacticGenerator, Theorem

ENSEMBLES: tuple[str, ...] = ("independent", "union", "shared", "mixture")  # union: independent's former name


def search(
    theorem: Theorem,
    env: ProofEnvironment,
    generators: Mapping[str, TacticGenerator] | TacticGenerator,
    *,
    strategy: Literal["best_first", "sampling"],
    budget: Budget,
    ensemble: Literal["independent", "union", "shared", "mixture"] = "independent",
    tactic_filter: TacticFilter | None = None,
    length_alpha: float = 0.0,
    samples_per_step: int = 1,
    parallel_passes: int = 1,
    seed: int | None = 0,
    progress: Callable[[dict], None] | None = None,
    cancel: threading.Event | None = None,
    all_passes: bool = False,
) -> SearchResult:
    """Search for a proof of `theorem`.

    - `generators`: one generator (its `name` labels the result), or a mapping of member
      name to generator combined by `ensemble` (see `search.ensemble`: `independent`, alias
      `union`, each member with the full budget; `shared`, the members splitting it;
      `mixture`; a mapping of one member runs the union machinery and fills `members` too).
    - `strategy`: `best_first` (budget: `max_expansions` × `tactics_per_expansion`,
      priority normalised by `depth**length_alpha`) or `sampling` (pass@`max_passes`,
      `samples_per_step` tactics asked per step, `parallel_passes` walked in lockstep,
      `seed` for the draw among several samples; `all_passes`: run every pass even after
      a proof and count the successful ones, for pass@n estimates).
    - `budget`: depth cap, wall-clock limit (seconds), tactic timeout (seconds).

    Bad arguments (an unknown strategy, no generators, a wrong type) raise `ValueError` /
    `TypeError`; everything that goes wrong during the search is in the returned record.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    if ensemble not in ENSEMBLES:
        raise ValueError(f"unknown ensemble {ensemble!r}; expected one of {ENSEMBLES}")
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a search.budget.Budget, got {type(budget).__name__}")
    if not isinstance(theorem, Theorem):
        raise TypeError(f"theorem must be a search.types.Theorem, got {type(theorem).__name__}")
    check_length_alpha(length_alpha)
    check_sampling_args(samples_per_step, parallel_passes)
    if tactic_filter is not None and not isinstance(tactic_filter, TacticFilter):
        raise TypeError(f"tactic_filter must be a TacticFilter, got {type(tactic_filter).__name__}")
    if cancel is not None and not callable(getattr(cancel, "is_set", None)):
        raise TypeError("cancel must be a threading.Event (or have an is_set method)")

    if isinstance(generators, Mapping):
        combine = {"independent": union, "union": union, "shared": shared, "mixture": mixture}[ensemble]
        return combine(
            theorem,
            env,
            generators,
            strategy=strategy,
            budget=budget,
            tactic_filter=tactic_filter,
            length_alpha=length_alpha,
            samples_per_step=samples_per_step,
            parallel_passes=parallel_passes,
            seed=seed,
            progress=progress,
            cancel=cancel,
            all_passes=all_passes,
        )
    if not callable(getattr(generators, "propose", None)):
        raise TypeError(f"generators must be a TacticGenerator or a mapping of them, got {type(generators).__name__}")
    if strategy == "best_first":
        return best_first_search(
            theorem,
            env,
            generators,
            budget,
            tactic_filter=tactic_filter,
            length_alpha=length_alpha,
            progress=progress,
            cancel=cancel,
        )
    return sampling_search(
        theorem,
        env,
        generators,
        budget,
        tactic_filter=tactic_filter,
        samples_per_step=samples_per_step,
        parallel_passes=parallel_passes,
        seed=seed,
        progress=progress,
        cancel=cancel,
        all_passes=all_passes,
    )
