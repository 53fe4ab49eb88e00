"""pass@N trajectory sampling: the DCO paper's test-time protocol.

Each pass walks from the root: at every step the generator is asked for
`samples_per_step` tactics for the current state (default 1: the model *samples* one
tactic, exactly the paper's protocol), one is taken and applied. The pass ends at the first
failed tactic, at the depth cap (`max_depth` tactics without a proof), when the generator
gives no usable tactic (an exception, an empty list, only forbidden tactics — all
counted), or with a proof. Passes share the environment, so a caching environment makes
repeated prefixes free (visible as cache hits).

- `samples_per_step > 1`: the usable candidates are a small sample; one is drawn with
  probability proportional to `exp(logprob)` (renormalised over the allowed ones) using a
  seeded `random.Random`. This makes deterministic generators (fixed lists, greedy
  decoding) explore; with a sampling model it re-weights k samples by their likelihood.
- `mixture` ensembles: every member proposes `samples_per_step` tactics and one is drawn
  from all of them, in proportion to `exp(logprob)`; the step is credited to the member
  whose tactic was drawn.
- `parallel_passes > 1` walks up to that many passes in lockstep with one batched
  generator call per round (many states feed one GPU batch). Passes are still counted
  exactly: at most `max_passes` are ever started; `passes` reports how many were.

The first verified proof ends the search. A proof verification rejects ends its pass and
the search goes on (see `search.engine` for the final status rules).
"""

from __future__ import annotations

import math
import random
import threading
from typing import Callable

from search.budget import Budget, Deadline
from search.engine import SearchEngine
from search.proposer import MixtureProposer, Proposal, SingleProposer
from search.result import SearchResult, Status
from search.runtime import SearchContext, error_result, start_root
from search.tactic_filter import TacticFilter
from search.types import Progress, ProofEnvironment, ProofState, Proved, TacticGenerator, Theorem


def check_sampling_args(samples_per_step: int, parallel_passes: int) -> None:
    """Raise `ValueError` naming the bad argument."""
    for name, value in (("samples_per_step", samples_per_step), ("parallel_passes", parallel_passes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


class _Pass:
    """One walk from the root. Invariant: `len(tactics) == len(members)` == depth of `state`."""

    __slots__ = ("state", "tactics", "members")

    def __init__(self, state: ProofState) -> None:
        self.state = state
        self.tactics: list[str] = []
        self.members: list[str] = []


class SamplingSearch(SearchEngine):
    """pass@N sampling of one theorem; `step()` advances every active pass by one tactic."""

    strategy = "sampling"

    def __init__(
        self,
        ctx: SearchContext,
        root: ProofState,
        proposer: SingleProposer | MixtureProposer,
        *,
        samples_per_step: int = 1,
        parallel_passes: int = 1,
        seed: int | None = 0,
    ) -> None:
        super().__init__(ctx, proposer)
        check_sampling_args(samples_per_step, parallel_passes)
        self.root = root
        self.samples_per_step = samples_per_step
        self.parallel_passes = parallel_passes
        self.max_passes = ctx.budget.max_passes
        self.max_depth = ctx.budget.max_depth
        self.rng = random.Random(seed)
        self._active: list[_Pass] = []

    def _choose(self, proposals: list[Proposal]) -> Proposal:
        if len(proposals) == 1:
            return proposals[0]
        top = proposals[0][1]  # proposals are sorted best first
        if top == -math.inf:
            return self.rng.choice(proposals)
        weights = [math.exp(logprob - top) for _, logprob, _ in proposals]
        return self.rng.choices(proposals, weights=weights)[0]

    def _step(self) -> Status | None:
        active = self._active
        if not active and self.passes >= self.max_passes:
            return Status.BUDGET_EXHAUSTED
        self.ctx.check()  # no pass is started once the search is out of time or cancelled
        while len(active) < self.parallel_passes and self.passes < self.max_passes:
            self.passes += 1
            active.append(_Pass(self.root))
        ctx = self.ctx
        proposals = self.proposer.propose([p.state.pp for p in active], self.samples_per_step, cut=False)
        still: list[_Pass] = []
        ended = 0
        max_depth = self.max_depth
        for walk, candidates in zip(active, proposals):
            if not candidates:
                ended += 1  # no usable tactic (recorded by the proposer): the pass ends
                continue
            tactic, _, member = self._choose(candidates)
            result = ctx.apply(walk.state, tactic)
            if isinstance(result, Progress):
                walk.state = result.state
                walk.tactics.append(tactic)
                walk.members.append(member)
                depth = len(walk.tactics)
                if depth > ctx.max_depth_reached:
                    ctx.max_depth_reached = depth
                if depth < max_depth:
                    still.append(walk)
                else:
                    ended += 1  # depth cap
            elif isinstance(result, Proved):
                tactics = walk.tactics + [tactic]
                if len(tactics) > ctx.max_depth_reached:
                    ctx.max_depth_reached = len(tactics)
                if self.found(tactics, walk.members + [member]):
                    self._active = []
                    self.report_progress()
                    return Status.PROVED
                ended += 1  # rejected proof: the pass ends
            else:
                ended += 1  # failed tactic
        self._active = still
        if ended:
            self.report_progress()
        return None

    def _progress_payload(self) -> dict:
        ctx = self.ctx
        return {
            "strategy": self.strategy,
            "passes": self.passes,
            "active_passes": len(self._active),
            "max_depth": ctx.max_depth_reached,
            "lean_calls": ctx.lean_calls,
            "elapsed_s": ctx.deadline.elapsed(),
        }


def sampling_search(
    theorem: Theorem,
    env: ProofEnvironment,
    generator: TacticGenerator,
    budget: Budget,
    *,
    tactic_filter: TacticFilter | None = None,
    samples_per_step: int = 1,
    parallel_passes: int = 1,
    seed: int | None = 0,
    progress: Callable[[dict], None] | None = None,
    cancel: threading.Event | None = None,
    member: str | None = None,
) -> SearchResult:
    """pass@`budget.max_passes` sampling of `theorem` with one generator.

    Starts the environment itself (the caller owns its lifecycle); the wall-clock limit
    includes the start. A start failure gives status ERROR.
    """
    check_sampling_args(samples_per_step, parallel_passes)
    deadline = Deadline(budget.time_limit_s)
    name = member if member is not None else getattr(generator, "name", "generator")
    root = start_root(env, theorem)
    if not isinstance(root, ProofState):
        return error_result(theorem, SamplingSearch.strategy, root, deadline.elapsed(), name)
    ctx = SearchContext(
        env, theorem, budget, tactic_filter=tactic_filter or TacticFilter(), deadline=deadline, cancel=cancel, progress=progress
    )
    engine = SamplingSearch(
        ctx,
        root,
        SingleProposer(name, generator, ctx),
        samples_per_step=samples_per_step,
        parallel_passes=parallel_passes,
        seed=seed,
    )
    return engine.run()
