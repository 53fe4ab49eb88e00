"""The no-model baseline: the same scored tactic list for every state."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from search.types import Candidate

# Closing tactics that often work on competition-style goals, most useful first.
DEFAULT_TACTICS: tuple[str, ...] = (
    "simp",
    "linarith",
    "norm_num",
    "omega",
    "aesop",
    "rfl",
    "ring",
    "decide",
    "tauto",
    "positivity",
    "nlinarith",
    "simp_all",
    "field_simp",
    "exact?",
    "trivial",
    "assumption",
)


def rank_logprobs(n: int) -> list[float]:
    """Log-probabilities (natural log) of a Zipf distribution over `n` ranks: rank i ∝ 1/(i+1)."""
    if n < 1:
        raise ValueError(f"need at least one tactic, got {n}")
    log_norm = math.log(sum(1.0 / (i + 1) for i in range(n)))
    return [-math.log(i + 1) - log_norm for i in range(n)]


class FixedTacticGenerator:
    """Proposes the top `k` of a fixed list, whatever the state.

    `tactics` is either a sequence (scored by rank with `rank_logprobs`) or a mapping
    tactic → log-probability (natural log, <= 0). Tactic texts are stripped and must be
    non-empty and distinct.
    """

    def __init__(self, tactics: Sequence[str] | Mapping[str, float] = DEFAULT_TACTICS, *, name: str = "fixed") -> None:
        if isinstance(tactics, Mapping):
            scored = [(str(t).strip(), float(s)) for t, s in tactics.items()]
        else:
            texts = [str(t).strip() for t in tactics]
            scored = list(zip(texts, rank_logprobs(len(texts)))) if texts else []
        if not scored:
            raise ValueError("a fixed tactic generator needs at least one tactic")
        seen: set[str] = set()
        for tactic, score in scored:
            if not tactic:
                raise ValueError("empty tactic text in the fixed tactic list")
            if tactic in seen:
                raise ValueError(f"tactic {tactic!r} appears twice in the fixed tactic list")
            if not score <= 0.0:
                raise ValueError(f"score of {tactic!r} must be a log-probability <= 0, got {score!r}")
            seen.add(tactic)
        scored.sort(key=lambda item: item[1], reverse=True)
        self.name = name
        self.candidates = [Candidate(tactic, score) for tactic, score in scored]

    def propose(self, states: Sequence[str], k: int, *, timeout_s: float | None = None) -> list[list[Candidate]]:
        """`timeout_s` is accepted for the contract; answering takes microseconds."""
        if k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        return [list(self.candidates[:k]) for _ in states]
