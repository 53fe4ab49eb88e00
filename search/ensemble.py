"""Ensembles of tactic generators (the `N_eff` checkpoints).

`independent` (alias `union`, its former name) — the DCO paper's ensemble. Every member runs its own search of the theorem with
its own full budget (expansions or passes, and `time_limit_s` measured on a clock that
only runs while that member is working). Members are interleaved round-robin, one step
(an expansion, or a round of passes) at a time, so an easy proof found by any member ends
the ensemble early; all members stop at the first *verified* proof (the others are
recorded as CANCELLED). They share the environment, so a caching environment gives every
member the Lean results of the others (cache hits). The result names the member that
found the proof and holds every member's own record in `members`; its counters are the
members' sums and its wall time is the ensemble's. Each member samples from its own seeded
stream, `stream_seed(seed, theorem id, member name)`.

`shared` — the same machinery, but the members split ONE budget (`Budget.split`: passes or
expansions, and the wall clock): an ensemble with the compute of a single search, for
equal-compute comparisons.

`mixture` — one search whose every expansion (best-first) or step (sampling) asks all
members for candidates and merges them by score (see `search.proposer.MixtureProposer`).
The record's `proof_members` lists, per proof step, the member whose candidate it was, and
`member` is the member that contributed most steps (ties: the one that contributed the
latest, so the closing member wins a tie). `members` is empty: there is one search.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Literal, Mapping

from search.best_first import BestFirstSearch, check_length_alpha
from search.budget import Budget, Deadline
from search.engine import SearchEngine
from search.proposer import MixtureProposer, SingleProposer
from search.result import SearchResult, Status
from search.runtime import MAX_ERROR_MESSAGES, SearchContext, error_result, start_root
from search.sampling import SamplingSearch, check_sampling_args, stream_seed
from search.tactic_filter import TacticFilter
from search.types import ProofEnvironment, ProofState, TacticGenerator, Theorem

Strategy = Literal["best_first", "sampling"]
STRATEGIES: tuple[str, ...] = ("best_first", "sampling")


class ActiveClock:
    """Monotonic seconds during which a member was running (between `resume` and `pause`)."""

    __slots__ = ("_accumulated", "_since")

    def __init__(self) -> None:
        self._accumulated = 0.0
        self._since: float | None = None

    def resume(self) -> None:
        if self._since is None:
            self._since = time.monotonic()

    def pause(self) -> None:
        if self._since is not None:
            self._accumulated += time.monotonic() - self._since
            self._since = None

    def __call__(self) -> float:
        if self._since is None:
            return self._accumulated
        return self._accumulated + (time.monotonic() - self._since)


def make_engine(
    strategy: str,
    ctx: SearchContext,
    root: ProofState,
    proposer: SingleProposer | MixtureProposer,
    *,
    length_alpha: float = 0.0,
    samples_per_step: int = 1,
    parallel_passes: int = 1,
    seed: int | None = 0,
    all_passes: bool = False,
) -> SearchEngine:
    if strategy == "best_first":
        return BestFirstSearch(ctx, root, proposer, length_alpha=length_alpha)
    if strategy == "sampling":
        return SamplingSearch(
            ctx, root, proposer, samples_per_step=samples_per_step, parallel_passes=parallel_passes, seed=seed,
            all_passes=all_passes,
        )
    raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")


def _check_members(generators: Mapping[str, TacticGenerator]) -> None:
    if not generators:
        raise ValueError("an ensemble needs at least one generator")
    for name, generator in generators.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"ensemble member names must be non-empty strings, got {name!r}")
        if not callable(getattr(generator, "propose", None)):
            raise TypeError(f"ensemble member {name!r} is not a TacticGenerator (no propose method)")


def _check_args(
    generators: Mapping[str, TacticGenerator], strategy: str, length_alpha: float, samples_per_step: int, parallel_passes: int
) -> None:
    _check_members(generators)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    check_length_alpha(length_alpha)
    check_sampling_args(samples_per_step, parallel_passes)


def _with_member(progress: Callable[[dict], None] | None, name: str) -> Callable[[dict], None] | None:
    if progress is None:
        return None

    def report(payload: dict) -> None:
        payload["member"] = name
        progress(payload)

    return report


def union(
    theorem: Theorem,
    env: ProofEnvironment,
    generators: Mapping[str, TacticGenerator],
    *,
    strategy: Strategy,
    budget: Budget,
    tactic_filter: TacticFilter | None = None,
    length_alpha: float = 0.0,
    samples_per_step: int = 1,
    parallel_passes: int = 1,
    seed: int | None = 0,
    progress: Callable[[dict], None] | None = None,
    cancel: threading.Event | None = None,
    budgets: Mapping[str, Budget | None] | None = None,
    all_passes: bool = False,
) -> SearchResult:
    """Every member searches with its own budget; the first verified proof stops them all.

    `budgets`: per member, a budget replacing `budget` (None: that member does not search).
    """
    _check_args(generators, strategy, length_alpha, samples_per_step, parallel_passes)
    tactic_filter = tactic_filter or TacticFilter()
    wall = Deadline(float("inf"))
    root = start_root(env, theorem)
    if not isinstance(root, ProofState):
        return error_result(theorem, strategy, root, wall.elapsed())

    names = [n for n in generators if budgets is None or budgets.get(n, budget) is not None]
    clocks: dict[str, ActiveClock] = {}
    engines: dict[str, SearchEngine] = {}
    for name in names:
        member_budget = budget if budgets is None else budgets.get(name, budget)
        assert member_budget is not None
        clock = ActiveClock()
        ctx = SearchContext(
            env,
            theorem,
            member_budget,
            tactic_filter=tactic_filter,
            deadline=Deadline(member_budget.time_limit_s, clock=clock),
            cancel=cancel,
            progress=_with_member(progress, name),
        )
        clocks[name] = clock
        engines[name] = make_engine(
            strategy,
            ctx,
            root,
            SingleProposer(name, generators[name], ctx),
            length_alpha=length_alpha,
            samples_per_step=samples_per_step,
            parallel_passes=parallel_passes,
            seed=None if seed is None else stream_seed(seed, theorem.id, name),
            all_passes=all_passes,
        )

    winner: str | None = None
    running = list(names)
    while running and winner is None:
        for name in list(running):
            clock = clocks[name]
            clock.resume()
            try:
                status = engines[name].step()
            finally:
                clock.pause()
            if status is None:
                continue
            running.remove(name)
            if status is Status.PROVED:
                winner = name
                break
    for name in running:
        engines[name].stop(Status.CANCELLED)

    members = {name: engines[name].result() for name in names}
    return combine_union(theorem, strategy, members, winner, wall.elapsed(), cancelled=cancel is not None and cancel.is_set())


def shared(
    theorem: Theorem,
    env: ProofEnvironment,
    generators: Mapping[str, TacticGenerator],
    *,
    strategy: Strategy,
    budget: Budget,
    **options,
) -> SearchResult:
    """The members split one budget (`Budget.split`), otherwise as `union`."""
    _check_members(generators)
    counter = "max_passes" if strategy == "sampling" else "max_expansions"
    parts = budget.split(len(generators), counter)
    return union(theorem, env, generators, strategy=strategy, budget=budget, budgets=dict(zip(generators, parts)), **options)


def combine_union(
    theorem: Theorem,
    strategy: str,
    members: dict[str, SearchResult],
    winner: str | None,
    wall_time_s: float,
    *,
    cancelled: bool = False,
) -> SearchResult:
    """The ensemble record from the members' records.

    Status: PROVED with the winner's proof; else FAILED with the first rejected proof if a
    member had one; else CANCELLED if the cancel event fired; else ERROR if any member
    ended in an infrastructure error; else TIMEOUT if any member
    timed out, BUDGET_EXHAUSTED if any used its budget, FAILED if every member exhausted
    its search space.
    """
    results = list(members.values())
    combined = SearchResult(theorem_id=theorem.id, status=Status.FAILED, strategy=strategy, members=members)
    if winner is not None:
        source = members[winner]
        combined.status = Status.PROVED
        combined.member = winner
        combined.proof = list(source.proof or [])
        combined.proof_members = list(source.proof_members or [])
        combined.verified = True
        combined.verification_message = source.verification_message
    else:
        rejected = next((r for r in results if r.proof is not None), None)
        statuses = {r.status for r in results}
        if rejected is not None:
            combined.status = Status.FAILED
            combined.member = rejected.member
            combined.proof = list(rejected.proof or [])
            combined.proof_members = list(rejected.proof_members or [])
            combined.verification_message = rejected.verification_message
        elif cancelled:
            combined.status = Status.CANCELLED
        elif Status.ERROR in statuses:
            combined.status = Status.ERROR  # an infrastructure error, never a failure
        elif Status.TIMEOUT in statuses:
            combined.status = Status.TIMEOUT
        elif Status.BUDGET_EXHAUSTED in statuses:
            combined.status = Status.BUDGET_EXHAUSTED
        elif Status.CANCELLED in statuses:
            combined.status = Status.CANCELLED
        else:
            combined.status = Status.FAILED
    for name, r in members.items():
        combined.add_counts(r, wall_time=False)  # members are interleaved: wall time is set below
        for message in r.errors:
            if len(combined.errors) < MAX_ERROR_MESSAGES:
                combined.errors.append(f"[{name}] {message}")
    for name, r in members.items():  # the cause that ended a member's search is always kept
        if r.status in (Status.ERROR, Status.TIMEOUT) and r.errors and f"[{name}] {r.errors[-1]}" not in combined.errors:
            combined.errors.append(f"[{name}] {r.errors[-1]}")
    combined.wall_time_s = wall_time_s
    return combined


def mixture(
    theorem: Theorem,
    env: ProofEnvironment,
    generators: Mapping[str, TacticGenerator],
    *,
    strategy: Strategy,
    budget: Budget,
    tactic_filter: TacticFilter | None = None,
    length_alpha: float = 0.0,
    samples_per_step: int = 1,
    parallel_passes: int = 1,
    seed: int | None = 0,
    progress: Callable[[dict], None] | None = None,
    cancel: threading.Event | None = None,
    all_passes: bool = False,
) -> SearchResult:
    """One search whose candidates come from every member, merged by score."""
    _check_args(generators, strategy, length_alpha, samples_per_step, parallel_passes)
    deadline = Deadline(budget.time_limit_s)
    root = start_root(env, theorem)
    if not isinstance(root, ProofState):
        return error_result(theorem, strategy, root, deadline.elapsed())
    ctx = SearchContext(
        env,
        theorem,
        budget,
        tactic_filter=tactic_filter or TacticFilter(),
        deadline=deadline,
        cancel=cancel,
        progress=progress,
    )
    proposer = MixtureProposer([SingleProposer(name, g, ctx) for name, g in generators.items()])
    engine = make_engine(
        strategy,
        ctx,
        root,
        proposer,
        length_alpha=length_alpha,
        samples_per_step=samples_per_step,
        parallel_passes=parallel_passes,
        seed=seed,
        all_passes=all_passes,
    )
    return engine.run()
