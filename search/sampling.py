"""pass@N trajectory sampling: the DCO paper's test-time protocol.

Each pass walks from the root: at every step the generator is asked for
`samples_per_step` tactics for the current state (default 1: the model *samples* one
tactic, exactly the paper's protocol), one is taken and applied. The pass ends at the first
failed tactic, at the depth cap (`max_depth` tactics without a proof), when the generator
gives no usable tactic (an exception, an empty list, only forbidden tactics — all
counted), or with a proof. Passes share the environment, so a caching environment makes
repeated prefixes free (visible as cache hits).

- `samples_per_step > 1`: the generator is asked for `k` samples and ONE of them, chosen
  uniformly at random (seeded) among the `k` it returned (repeats count), is the step's
  tactic. For a sampling model this is exactly one draw from the model (the paper's
  protocol; never a re-weighting by probability, which would sharpen `p` towards `p²`);
  for a deterministic generator (a fixed list, beam search) it is a uniform choice among
  its `k` tactics. With `k = 1` a deterministic generator makes every pass the same: the
  record's `distinct_trajectories` says how many different tactic sequences were tried.
- `mixture` ensembles: every member proposes and one of the (distinct) proposals is drawn
  uniformly; the step is credited to the member whose tactic was drawn.
- Seeds: `stream_seed(run seed, theorem id, member)` gives each theorem and member its
  own stream, independent of scheduling (callers pass it as `seed`).
- `parallel_passes > 1` walks up to that many passes in lockstep with one batched
  generator call per round (many states feed one GPU batch). Passes are still counted
  exactly: at most `max_passes` are ever started; `passes` reports how many were.

The first verified proof ends the search once every pass numbered below it has ended
(passes in lockstep may finish out of order), so `first_success_pass` is the lowest index
of a pass that found a verified proof: pass@n of this run is `first_success_pass <= n`,
an unbiased estimate of pass@n for every n up to `passes` (the first n passes of N
independent passes are n independent passes). With `all_passes` the search runs all
`max_passes` passes even after a proof and records `successful_passes` c, for the
lower-variance unbiased estimate `1 - C(N-c, n) / C(N, n)`. A proof verification rejects ends its pass
and the search goes on (see `search.engine` for the final status rules).
"""

from __future__ import annotations

import hashlib
import random
import threading
from typing import Any, Callable, Sequence

from search.budget import Budget, Deadline
from search.engine import SearchEngine
from search.proposer import MixtureProposer, Proposal, SingleProposer, deadline_call
from search.result import SearchResult, Status
from search.runtime import SearchContext, StopSearch, error_result, start_root
from search.tactic_filter import TacticFilter
from search.types import Progress, ProofEnvironment, ProofState, Proved, TacticGenerator, Theorem


def check_sampling_args(samples_per_step: int, parallel_passes: int) -> None:
    """Raise `ValueError` naming the bad argument."""
    for name, value in (("samples_per_step", samples_per_step), ("parallel_passes", parallel_passes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def stream_seed(*parts: object) -> int:
    """A 63-bit seed determined by `parts` alone (e.g. run seed, theorem id, member name):
    each theorem and member gets its own random stream, whatever the scheduling."""
    digest = hashlib.sha256("\x00".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class OneOfK:
    """A generator view returning, per state, one of the `k` candidates the inner generator
    gave, chosen uniformly at random with `rng` (repeats count: one model sample)."""

    def __init__(self, inner: TacticGenerator, rng: random.Random) -> None:
        self.inner = inner
        self.name = getattr(inner, "name", "generator")
        self.rng = rng
        self._call = deadline_call(inner)

    def propose(self, states: Sequence[str], k: int, *, timeout_s: float | None = None) -> Any:
        answer = self._call(states, k, timeout_s)
        if not isinstance(answer, (list, tuple)):
            return answer  # malformed: the proposer records it
        out = []
        for candidates in answer:
            if isinstance(candidates, (list, tuple)) and len(candidates) > 1:
                candidates = [candidates[self.rng.randrange(min(len(candidates), k))]]
            out.append(candidates)
        return out


class _Pass:
    """One walk from the root (`index`: 1-based pass number). Invariant:
    `len(tactics) == len(members)` == depth of `state`."""

    __slots__ = ("state", "tactics", "members", "index")

    def __init__(self, state: ProofState, index: int) -> None:
        self.state = state
        self.tactics: list[str] = []
        self.members: list[str] = []
        self.index = index


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
        all_passes: bool = False,
    ) -> None:
        super().__init__(ctx, proposer)
        self.all_passes = all_passes
        self.successes = 0  # passes that ended with a verified proof (all_passes mode)
        self._verified: dict[tuple[str, ...], bool] = {}  # verification verdicts by proof (all_passes mode)
        check_sampling_args(samples_per_step, parallel_passes)
        self.root = root
        self.samples_per_step = samples_per_step
        self.parallel_passes = parallel_passes
        self.max_passes = ctx.budget.max_passes
        self.max_depth = ctx.budget.max_depth
        self.rng = random.Random(seed)
        self._active: list[_Pass] = []
        self._trajectories: set[int] = set()  # hashes of the tactic sequences of ended passes
        self._best: int | None = None  # lowest index of a pass with a verified proof
        if samples_per_step > 1:
            singles = proposer.members if isinstance(proposer, MixtureProposer) else [proposer]
            for single in singles:
                single.generator = OneOfK(single.generator, self.rng)

    def _choose(self, proposals: list[Proposal]) -> Proposal:
        if len(proposals) == 1:
            return proposals[0]
        return self.rng.choice(proposals)  # a mixture: one member's sample, uniformly

    def _step(self) -> Status | None:
        try:
            return self._advance()
        except StopSearch:
            if self._best is not None:  # out of time while finishing lower-numbered passes
                self._active = []
                return Status.PROVED
            raise

    def _advance(self) -> Status | None:
        active = self._active
        if not active and self.passes >= self.max_passes:
            return Status.PROVED if self._best is not None else Status.BUDGET_EXHAUSTED
        self.ctx.check()  # no pass is started once the search is out of time or cancelled
        while (self._best is None or self.all_passes) and len(active) < self.parallel_passes and self.passes < self.max_passes:
            self.passes += 1
            active.append(_Pass(self.root, self.passes))
        ctx = self.ctx
        trajectories = self._trajectories
        proposals = self.proposer.propose([p.state.pp for p in active], self.samples_per_step, cut=False)
        still: list[_Pass] = []
        ended = 0
        max_depth = self.max_depth
        for walk, candidates in zip(active, proposals):
            if not candidates:
                ended += 1  # no usable tactic (recorded by the proposer): the pass ends
                trajectories.add(hash(tuple(walk.tactics)))
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
                    trajectories.add(hash(tuple(walk.tactics)))
                continue
            ended += 1
            trajectories.add(hash((*walk.tactics, tactic)))
            if isinstance(result, Proved):
                tactics = walk.tactics + [tactic]
                if len(tactics) > ctx.max_depth_reached:
                    ctx.max_depth_reached = len(tactics)
                if self.all_passes:
                    self._count_success(walk, tactics, walk.members + [member])
                elif (self._best is None or walk.index < self._best) and self.found(tactics, walk.members + [member]):
                    self._best = walk.index
                # a rejected proof ends its pass only
            # else a failed tactic ends the pass
        if self._best is not None and not self.all_passes:
            # Passes numbered above the first success no longer matter; lower ones may still
            # succeed (pass@n needs the lowest index), so they are walked to their end.
            still = [walk for walk in still if walk.index < self._best]
            if not still:
                self._active = []
                self.report_progress()
                return Status.PROVED
        self._active = still
        if ended:
            self.report_progress()
        return None

    def _count_success(self, walk: _Pass, tactics: list[str], members: list[str]) -> None:
        """all_passes: count a pass whose proof verifies (a proof verified once is not
        re-checked); the lowest-numbered one supplies the reported proof."""
        key = tuple(tactics)
        ok = self._verified.get(key)
        if ok is None:
            best, proof = self._best, (self.proof, self.proof_members, self.verification_message)
            ok = self._verified[key] = self.found(tactics, members)
            if ok and best is not None and best < walk.index:
                self.proof, self.proof_members, self.verification_message = proof  # keep the lower pass's proof
        if not ok:
            return
        self.successes += 1
        if self._best is None or walk.index < self._best:
            if self.proof != tactics:
                self.proof, self.proof_members = tactics, members
            self._best = walk.index

    def result(self) -> SearchResult:
        result = super().result()
        result.distinct_trajectories = len(self._trajectories)
        result.first_success_pass = self._best if result.status is Status.PROVED else None
        if self.all_passes:
            result.successful_passes = self.successes
        return result

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
    all_passes: bool = False,
) -> SearchResult:
    """pass@`budget.max_passes` sampling of `theorem` with one generator (`all_passes`: go on
    after the first proof and count the successful passes, `successful_passes`).

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
        all_passes=all_passes,
    )
    return engine.run()
