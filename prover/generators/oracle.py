"""A test double with real semantics: a "model" that knows the replay data.

For each state it holds a fixed distribution over the tactics recorded from that state
(in the replay graph) and a few distractors drawn from the other recorded tactics (which
fail there). The recorded tactics share equally a total probability drawn from
`recorded_mass`, the distractors share the rest with skewed weights, so the recorded
tactic is often but NOT always the top-scored candidate. Everything is seeded: the distribution of a state
depends only on `(seed, state)`; the sampling stream only on `seed` and the call order.
"""

from __future__ import annotations

import copy
import hashlib
import heapq
import math
import random
import threading
from typing import Sequence

from prover.replay import ReplayEnvironment, collapse_whitespace
from search.types import Candidate


class OracleGenerator:
    """Proposes recorded tactics among distractors, with varied log-probabilities.

    `propose(states, k)`: when `k` covers a state's whole support (recorded tactics plus
    `distractors`), all of it is returned; otherwise `k` distinct candidates are sampled
    without replacement in proportion to their probabilities (Gumbel top-k), like a model
    sampled at temperature 1. States with no recorded tactic get distractors only.
    `logprob`s are natural logs of the per-state distribution, which sums to 1.
    """

    def __init__(
        self,
        env: ReplayEnvironment,
        *,
        seed: int = 0,
        distractors: int = 5,
        recorded_mass: tuple[float, float] = (0.3, 0.95),
        name: str = "oracle",
    ) -> None:
        low, high = recorded_mass
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"recorded_mass must satisfy 0 < low <= high <= 1, got {recorded_mass!r}")
        if distractors < 0:
            raise ValueError(f"distractors must be >= 0, got {distractors!r}")
        self.name = name
        self.env = env
        self.seed = seed
        self.distractors = distractors
        self.recorded_mass = (low, high)
        self._pool = env.all_tactics()
        self._support: dict[str, list[Candidate]] = {}
        self._lock = threading.Lock()
        self._rng = random.Random(seed)

    def fork(self, seed: int) -> "OracleGenerator":
        """The same "model" (per-state distributions, shared support cache) sampled from its
        own stream `seed`: a search that owns a fork draws independently of every other."""
        twin = copy.copy(self)
        twin._rng = random.Random(seed)
        return twin

    def _state_rng(self, state: str) -> random.Random:
        digest = hashlib.sha256(f"{self.seed}\x00{state}".encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "big"))

    def support(self, state: str) -> list[Candidate]:
        """The state's whole distribution, highest probability first."""
        with self._lock:
            cached = self._support.get(state)
        if cached is not None:
            return cached
        rng = self._state_rng(state)
        recorded = self.env.recorded_tactics(state)
        excluded = {collapse_whitespace(t) for t in recorded}
        others = [t for t in self._pool if t not in excluded]
        drawn = rng.sample(others, min(self.distractors, len(others)))
        mass = rng.uniform(*self.recorded_mass) if recorded else 0.0
        if not drawn:
            mass = 1.0
        candidates = [Candidate(t, math.log(mass / len(recorded))) for t in recorded] if recorded else []
        candidates += _share(drawn, 1.0 - mass, rng)
        candidates.sort(key=lambda c: c.logprob, reverse=True)
        with self._lock:
            self._support.setdefault(state, candidates)
        return candidates

    def propose(self, states: Sequence[str], k: int, *, timeout_s: float | None = None) -> list[list[Candidate]]:
        """`timeout_s` is accepted for the contract; answering takes microseconds."""
        if k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        out: list[list[Candidate]] = []
        for state in states:
            support = self.support(state)
            if k >= len(support):
                out.append(list(support))
                continue
            with self._lock:
                keys = [c.logprob + _gumbel(self._rng) for c in support]
            top = heapq.nlargest(k, range(len(support)), key=keys.__getitem__)
            out.append([support[i] for i in top])
        return out


def _gumbel(rng: random.Random) -> float:
    """A standard Gumbel draw (`u` in (0, 1): `random()` is never 1 and 0 is replaced)."""
    u = rng.random() or 5e-324
    return -math.log(-math.log(u))


def _share(tactics: Sequence[str], mass: float, rng: random.Random) -> list[Candidate]:
    """Split probability `mass` over `tactics` with skewed (Dirichlet(0.5)) weights."""
    if not tactics or mass <= 0.0:
        return []
    weights = [rng.gammavariate(0.5, 1.0) + 1e-12 for _ in tactics]
    total = sum(weights)
    return [Candidate(t, math.log(mass * w / total)) for t, w in zip(tactics, weights)]
