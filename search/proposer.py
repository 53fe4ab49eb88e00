"""Asking tactic generators for candidates, under the budget and the shared filter.

A `Proposer` turns one or several `TacticGenerator`s into lists of usable proposals:
`(tactic, logprob, member)` triples, distinct, allowed by the tactic filter, best first.

- `SingleProposer` asks one generator.
- `MixtureProposer` (the `mixture` ensemble) asks every member for `k` candidates for the
  same states, merges them by score (a tactic proposed by several members keeps its best
  log-probability and is credited to the member that gave it; the other copies count as
  duplicates) and keeps the `k` best.

Before each generator call the context checks the cancel event and the deadline, and the
call gets the seconds left as its `timeout_s` (the generator answers or raises within it).

Failures:
- infrastructure failures — `GeneratorError` (an endpoint down or stalled, HTTP 503 after
  the client's retries, a dead actor, out of memory), `OSError` (connection reset,
  refused, timed out) and out-of-memory errors — end the search (`StopSearch`): with
  status TIMEOUT when the generator ran out of the search's time (`GeneratorTimeout`, or
  any of them once the deadline has passed), else ERROR; the cause is always kept in the
  error log. They are never turned into "no candidates", which would read as FAILED.
- an answer that arrives after the deadline is dropped (recorded as `generator_late`) and
  the search stops with TIMEOUT: it never acts on time it did not have.
- other exceptions (a generator bug), a wrong number of lists, empty lists and malformed
  candidates are recorded in the error log and yield an empty list for the affected
  states; they never raise.

Generators written before the `timeout_s` keyword existed (no such parameter) are called
without it; the deadline still holds for them through the late-answer rule.
"""

from __future__ import annotations

import inspect
import time
from typing import Callable, Sequence

from search.result import Status
from search.runtime import SearchContext, StopSearch
from search.tactic_filter import normalize_pairs
from search.types import Candidate, GeneratorError, GeneratorTimeout, TacticGenerator

_VERDICT_CACHE_SIZE = 1 << 16  # distinct tactic strings whose filter verdict is memoised

Proposal = tuple[str, float, str]  # (tactic, natural-log probability <= 0, member name)

ProposeCall = Callable[[Sequence[str], int, "float | None"], list[list[Candidate]]]


_ACCEPTS_TIMEOUT: dict[object, bool] = {}  # per propose function (one inspection per class)


def accepts_timeout(propose: Callable[..., object]) -> bool:
    """Whether a `propose` method takes the `timeout_s` keyword (or any keyword)."""
    key = getattr(propose, "__func__", propose)
    known = _ACCEPTS_TIMEOUT.get(key)
    if known is not None:
        return known
    try:
        parameters = inspect.signature(propose).parameters.values()
        verdict = any(p.name == "timeout_s" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    except (TypeError, ValueError):  # builtins / C callables: assume the current contract
        verdict = True
    if len(_ACCEPTS_TIMEOUT) < 1024:
        _ACCEPTS_TIMEOUT[key] = verdict
    return verdict


def deadline_call(generator: TacticGenerator) -> ProposeCall:
    """`generator.propose` as `(states, k, timeout_s)`; `timeout_s` is dropped for a
    generator whose `propose` does not take it (its late answers are dropped by the caller)."""
    propose = generator.propose
    if accepts_timeout(propose):
        return lambda states, k, timeout_s: propose(states, k, timeout_s=timeout_s)
    return lambda states, k, timeout_s: propose(states, k)


def is_infrastructure_failure(exc: BaseException) -> bool:
    """A failure of the generation layer rather than of the generator's logic: the search
    must end with ERROR/TIMEOUT rather than read it as "no candidates"."""
    if isinstance(exc, (GeneratorError, OSError, MemoryError)):
        return True
    # torch.cuda.OutOfMemoryError / torch.OutOfMemoryError, without importing torch here.
    return any(cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__)


class SingleProposer:
    """Proposals from one generator, credited to `name`."""

    def __init__(self, name: str, generator: TacticGenerator, ctx: SearchContext) -> None:
        self.name = name
        self.generator = generator
        self.ctx = ctx
        self._allows = ctx.tactic_filter.allows
        self._verdicts: dict[str, bool] = {}  # filter decisions memoised per tactic string

    @property
    def generator(self) -> TacticGenerator:
        return self._generator

    @generator.setter
    def generator(self, generator: TacticGenerator) -> None:
        # Invariant: `_call` always calls the current generator (a search may wrap it, e.g.
        # sampling's one-of-k view), with `timeout_s` when it takes it.
        self._generator = generator
        self._call = deadline_call(generator)

    def _allowed(self, tactic: str) -> bool:
        verdict = self._verdicts.get(tactic)
        if verdict is None:
            if len(self._verdicts) >= _VERDICT_CACHE_SIZE:
                self._verdicts.clear()
            verdict = self._verdicts[tactic] = self._allows(tactic)
        return verdict

    def raw(self, states: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
        """Normalised, filtered `(tactic, logprob)` pairs per state, at most `k`, best first.
        Raises `StopSearch`: before the call (cancelled, out of time), after an
        infrastructure failure, or when the answer came after the deadline."""
        ctx = self.ctx
        remaining = ctx.check()
        ctx.generator_calls += 1
        start = time.perf_counter()
        try:
            answer = self._call(states, k, remaining)
        except Exception as exc:
            ctx.generator_time_s += time.perf_counter() - start
            if is_infrastructure_failure(exc):
                self._stop_on_failure(exc)
            # a generator bug: recorded, the states get no candidates
            ctx.errors.record("generator_exception", f"{self.name}: {type(exc).__name__}: {exc}")
            return [[] for _ in states]
        elapsed = time.perf_counter() - start
        ctx.generator_time_s += elapsed
        late = -ctx.deadline.remaining()
        if late > 0.0:
            ctx.errors.record(
                "generator_late",
                f"{self.name}: answered {elapsed:.3f} s after the call, {late:.3f} s past the search's deadline; answer dropped",
                keep=True,
            )
            raise StopSearch(Status.TIMEOUT)
        if not isinstance(answer, (list, tuple)) or len(answer) != len(states):
            got = f"{len(answer)} lists" if isinstance(answer, (list, tuple)) else type(answer).__name__
            ctx.errors.record("generator_invalid", f"{self.name}: propose() for {len(states)} states returned {got}")
            return [[] for _ in states]
        allowed = self._allowed
        out: list[list[tuple[str, float]]] = []
        for candidates in answer:
            if not isinstance(candidates, (list, tuple)):
                ctx.errors.record("generator_invalid", f"{self.name}: a state's candidates are a {type(candidates).__name__}, not a list")
                out.append([])
                continue
            if not candidates:
                ctx.errors.record("generator_empty", f"{self.name}: no candidates for a state")
                out.append([])
                continue
            pairs, dropped, invalid_example = normalize_pairs(candidates)
            kept = [pair for pair in pairs if allowed(pair[0])]
            if len(kept) != len(pairs):
                dropped["forbidden"] = len(pairs) - len(kept)
            if len(kept) > k:  # the contract is "up to k": extra ones are cut, counted
                dropped["over_k"] = len(kept) - k
                del kept[k:]
            if dropped:
                ctx.add_dropped(dropped)
                if invalid_example is not None:
                    ctx.errors.record("generator_invalid", f"{self.name}: malformed candidate {invalid_example}")
            out.append(kept)
        return out

    def _stop_on_failure(self, exc: BaseException) -> None:
        """End the search after an infrastructure failure, keeping its cause."""
        ctx = self.ctx
        timed_out = isinstance(exc, GeneratorTimeout) or ctx.deadline.remaining() <= 0.0
        kind = "generator_timeout" if timed_out else "generator_error"
        ctx.errors.record(kind, f"{self.name}: {type(exc).__name__}: {exc}", keep=True)
        raise StopSearch(Status.TIMEOUT if timed_out else Status.ERROR) from None

    def propose(self, states: Sequence[str], k: int, cut: bool = True) -> list[list[Proposal]]:
        """Proposals per state, best first, at most `k` (`cut` only matters for mixtures)."""
        name = self.name
        return [[(t, lp, name) for t, lp in pairs] for pairs in self.raw(states, k)]


class MixtureProposer:
    """Proposals from every member for the same states, merged by score, the `k` best kept."""

    def __init__(self, members: Sequence[SingleProposer]) -> None:
        if not members:
            raise ValueError("a mixture needs at least one member")
        self.members = list(members)
        self.ctx = members[0].ctx
        if any(m.ctx is not self.ctx for m in self.members):
            raise ValueError("mixture members must share one SearchContext (one search, one budget)")
        self.name = "mixture(" + ",".join(m.name for m in members) + ")"

    def propose(self, states: Sequence[str], k: int, cut: bool = True) -> list[list[Proposal]]:
        """Every member's `k` candidates per state, merged best first; the `k` best when `cut`,
        else all of them (up to `k` per member)."""
        merged: list[dict[str, tuple[float, str]]] = [{} for _ in states]
        duplicates = 0
        for member in self.members:
            for best, pairs in zip(merged, member.raw(states, k)):
                for tactic, logprob in pairs:
                    previous = best.get(tactic)
                    if previous is None:
                        best[tactic] = (logprob, member.name)
                    else:
                        duplicates += 1
                        if logprob > previous[0]:  # ties stay with the earlier member
                            best[tactic] = (logprob, member.name)
        if duplicates:
            self.ctx.add_dropped({"duplicate": duplicates})
        out: list[list[Proposal]] = []
        for best in merged:
            ranked = sorted(best.items(), key=lambda item: -item[1][0])
            if cut and len(ranked) > k:
                self.ctx.add_dropped({"mixture_cut": len(ranked) - k})
                ranked = ranked[:k]
            out.append([(tactic, logprob, member) for tactic, (logprob, member) in ranked])
        return out
