"""The caching environment: hits marked and counted, shared by ensemble members, transient
failures never cached, bounded LRU, delegation."""

from __future__ import annotations

import threading
from typing import Sequence

import pytest

from prover.cache import CachingEnvironment, canonical_tactic
from prover.generators import OracleGenerator
from prover.replay import ReplayEnvironment
from search.api import search
from search.budget import Budget
from search.types import (
    Failed,
    FailureKind,
    ProofState,
    Progress,
    Proved,
    TacticResult,
    Theorem,
    Verification,
)


class CountingEnv:
    """A tiny deterministic environment: `next` moves state n to n+1, `done` proves from 2,
    `flaky` times out on its first call then fails, `crash` crashes; counts calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.entered = 0
        self.exited = 0
        self._flaky_seen = False

    def start(self, theorem: Theorem) -> ProofState:
        return ProofState("0")

    def apply(self, state: ProofState, tactic: str, timeout_s: float | None = None) -> TacticResult:
        self.calls.append((state.pp, tactic))
        if tactic.strip() == "next":
            return Progress(ProofState(str(int(state.pp) + 1), handle=object()))
        if tactic.strip() == "done" and state.pp == "2":
            return Proved()
        if tactic == "flaky":
            if not self._flaky_seen:
                self._flaky_seen = True
                return Failed(FailureKind.TIMEOUT, "timed out")
            return Failed(FailureKind.LEAN_ERROR, "error")
        if tactic == "crash":
            return Failed(FailureKind.CRASH, "backend died")
        return Failed(FailureKind.LEAN_ERROR, f"unknown tactic {tactic}")

    def verify(self, theorem: Theorem, tactics: Sequence[str]) -> Verification:
        return Verification(list(tactics) == ["next", "next", "done"])

    def __enter__(self) -> "CountingEnv":
        self.entered += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.exited += 1


def test_hits_are_marked_and_counted() -> None:
    inner = CountingEnv()
    env = CachingEnvironment(inner)
    first = env.apply(ProofState("0"), "next")
    second = env.apply(ProofState("0"), "next  ")  # trailing whitespace: same key
    assert isinstance(first, Progress) and not first.from_cache
    assert isinstance(second, Progress) and second.from_cache and second.state == first.state
    assert env.apply(ProofState("2"), "done") == Proved()
    assert env.apply(ProofState("2"), "done") == Proved(from_cache=True)
    error = env.apply(ProofState("0"), "bogus")
    assert env.apply(ProofState("0"), "bogus") == Failed(error.kind, error.message, from_cache=True)
    assert (env.hits, env.misses) == (3, 3)
    assert len(inner.calls) == 3


def test_transient_failures_are_not_cached() -> None:
    inner = CountingEnv()
    env = CachingEnvironment(inner)
    assert env.apply(ProofState("0"), "flaky").kind is FailureKind.TIMEOUT
    again = env.apply(ProofState("0"), "flaky")
    assert again.kind is FailureKind.LEAN_ERROR and not again.from_cache  # retried, not replayed
    assert env.apply(ProofState("0"), "flaky").from_cache  # the deterministic error is cached
    for _ in range(2):
        assert env.apply(ProofState("0"), "crash") == Failed(FailureKind.CRASH, "backend died")
    assert env.stats().transient_not_cached == 3
    assert [c for c in inner.calls if c[1] == "crash"] == [("0", "crash")] * 2


def test_layout_is_part_of_the_key() -> None:
    assert canonical_tactic("  simp\n\n  ring  \n") == "simp\n  ring"
    assert canonical_tactic("a\n  b") != canonical_tactic("a\nb")


def test_lru_bound_evicts_least_recent() -> None:
    inner = CountingEnv()
    env = CachingEnvironment(inner, max_entries=2)
    env.apply(ProofState("0"), "next")
    env.apply(ProofState("1"), "next")
    env.apply(ProofState("0"), "next")  # hit: "0" is now the most recent
    env.apply(ProofState("2"), "next")  # evicts "1"
    assert env.stats().entries == 2 and env.evictions == 1
    assert env.apply(ProofState("0"), "next").from_cache
    assert not env.apply(ProofState("1"), "next").from_cache
    with pytest.raises(ValueError):
        CachingEnvironment(inner, max_entries=0)


def test_delegates_start_verify_and_context() -> None:
    inner = CountingEnv()
    env = CachingEnvironment(inner)
    with env as entered:
        assert entered is env
        assert env.start(Theorem("t")) == ProofState("0")
        assert env.verify(Theorem("t"), ["next", "next", "done"]).ok
        assert not env.verify(Theorem("t"), ["done"]).ok
    assert (inner.entered, inner.exited) == (1, 1)


def test_concurrent_use_counts_every_call() -> None:
    inner = CountingEnv()
    env = CachingEnvironment(inner)

    def work() -> None:
        for n in range(50):
            env.apply(ProofState(str(n % 10)), "next")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert env.hits + env.misses == 200
    assert env.misses == len(inner.calls) >= 10
    assert env.stats().entries == 10


def test_ensemble_members_share_the_cache() -> None:
    """Union of two oracle members over one CachingEnvironment: the second member's calls on
    states the first already explored are hits, counted in its own record and in the sum."""
    replay = ReplayEnvironment.from_benchmark()
    theorem_id = next(p.theorem_id for p in replay.connected_proofs() if p.length >= 3)
    env = CachingEnvironment(replay)
    members = {"a": OracleGenerator(replay, seed=0), "b": OracleGenerator(replay, seed=1)}
    result = search(Theorem(theorem_id), env, members, strategy="best_first", budget=Budget(max_expansions=20))
    assert result.proved and result.verified
    a, b = result.members["a"], result.members["b"]
    assert b.cache_hits >= 1  # at least the recorded tactic at the root, applied first by "a"
    assert result.cache_hits == a.cache_hits + b.cache_hits == env.hits
    assert result.cache_misses == a.cache_misses + b.cache_misses == env.misses
    assert replay.apply_calls == env.misses

    # A second search of the same theorem over the same cache costs the backend nothing.
    calls_before = replay.apply_calls
    again = search(Theorem(theorem_id), env, members["a"], strategy="best_first", budget=Budget(max_expansions=20))
    assert again.proved and again.cache_misses == 0 and again.cache_hits == again.lean_calls > 0
    assert replay.apply_calls == calls_before
