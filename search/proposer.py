"""Asking tactic generators for candidates, under the budget and the shared filter.

A `Proposer` turns one or several `TacticGenerator`s into lists of usable proposals:
`(tactic, logprob, member)` triples, distinct, allowed by the tactic filter, best first.

- `SingleProposer` asks one generator.
- `MixtureProposer` (the `mixture` ensemble) asks every member for `k` candidates for the
  same states, merges them by score (a tactic proposed by several members keeps its best
  log-probability and is credited to the member that gave it; the other copies count as
  duplicates) and keeps the `k` best.

Before each generator call the context checks the cancel event and the deadline.
Exceptions, a wrong number of lists, empty lists and malformed candidates are recorded in
the error log and yield an empty list for the affected states; they never raise.
"""

from __future__ import annotations

import time
from typing import Sequence

from search.runtime import SearchContext
from search.tactic_filter import normalize_pairs
from search.types import TacticGenerator

_VERDICT_CACHE_SIZE = 1 << 16  # distinct tactic strings whose filter verdict is memoised

Proposal = tuple[str, float, str]  # (tactic, natural-log probability <= 0, member name)


class SingleProposer:
    """Proposals from one generator, credited to `name`."""

    def __init__(self, name: str, generator: TacticGenerator, ctx: SearchContext) -> None:
        self.name = name
        self.generator = generator
        self.ctx = ctx
        self._allows = ctx.tactic_filter.allows
        self._verdicts: dict[str, bool] = {}  # filter decisions memoised per tactic string

    def _allowed(self, tactic: str) -> bool:
        verdict = self._verdicts.get(tactic)
        if verdict is None:
            if len(self._verdicts) >= _VERDICT_CACHE_SIZE:
                self._verdicts.clear()
            verdict = self._verdicts[tactic] = self._allows(tactic)
        return verdict

    def raw(self, states: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
        """Normalised, filtered `(tactic, logprob)` pairs per state, at most `k`, best first.
        May raise `StopSearch` (checked before the generator call)."""
        ctx = self.ctx
        ctx.check()
        ctx.generator_calls += 1
        start = time.perf_counter()
        try:
            answer = self.generator.propose(states, k)
        except Exception as exc:  # a model/runtime failure: recorded, the states get no candidates
            ctx.generator_time_s += time.perf_counter() - start
            ctx.errors.record("generator_exception", f"{self.name}: {type(exc).__name__}: {exc}")
            return [[] for _ in states]
        ctx.generator_time_s += time.perf_counter() - start
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
