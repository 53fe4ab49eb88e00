"""Every generator call carries the search's remaining time; generator failures end the
search with ERROR (or TIMEOUT when its time ran out) and their cause, never FAILED."""

from __future__ import annotations

import time
from typing import Sequence

import pytest

from search.api import search
from search.budget import Budget
from search.result import Status
from search.types import Candidate, GeneratorError, GeneratorTimeout, Theorem
from tests.search_doubles import GraphEnv, ScriptedGenerator, chain

THM = Theorem("thm")


class Recording:
    """Answers like a fixed list; remembers the `timeout_s` of each call."""

    name = "rec"

    def __init__(self, tactics: Sequence[tuple[str, float]], *, error: BaseException | None = None, sleep_s: float = 0.0) -> None:
        self.tactics = [Candidate(t, lp) for t, lp in tactics]
        self.error = error
        self.sleep_s = sleep_s
        self.timeouts: list[float | None] = []

    def propose(self, states, k, *, timeout_s=None):
        self.timeouts.append(timeout_s)
        if self.sleep_s:
            time.sleep(self.sleep_s)
        if self.error is not None:
            raise self.error
        return [list(self.tactics[:k]) for _ in states]


class Stalling:
    """A model endpoint that never answers: honours the deadline by raising at it."""

    name = "stall"

    def __init__(self) -> None:
        self.timeouts: list[float | None] = []

    def propose(self, states, k, *, timeout_s=None):
        self.timeouts.append(timeout_s)
        assert timeout_s is not None, "the search must pass its remaining time"
        time.sleep(timeout_s)
        raise GeneratorTimeout(f"no answer from http://model:8000 within {timeout_s:.2f} s")


def test_every_call_carries_the_remaining_time() -> None:
    env = GraphEnv(chain(3))
    gen = Recording([("t0", -0.1), ("t1", -0.2), ("t2", -0.3)])
    budget = Budget(time_limit_s=30.0, max_expansions=10, tactics_per_expansion=3)
    r = search(THM, env, gen, strategy="best_first", budget=budget)
    assert r.status is Status.PROVED
    assert gen.timeouts and all(t is not None and 0 < t <= 30.0 for t in gen.timeouts)
    assert gen.timeouts == sorted(gen.timeouts, reverse=True)  # the budget only shrinks


@pytest.mark.parametrize("strategy", ["best_first", "sampling"])
def test_generator_error_ends_the_search_with_error_and_its_cause(strategy: str) -> None:
    env = GraphEnv(chain(3))
    gen = Recording([], error=GeneratorError("http://model:8000: HTTP 503 after 4 tries"))
    r = search(THM, env, gen, strategy=strategy, budget=Budget(time_limit_s=30.0, max_passes=4))
    assert r.status is Status.ERROR
    assert r.error_counts.get("generator_error") == 1 and len(gen.timeouts) == 1
    assert any("HTTP 503 after 4 tries" in e for e in r.errors)


def test_connection_failures_are_infrastructure_errors() -> None:
    env = GraphEnv(chain(3))
    r = search(THM, env, Recording([], error=ConnectionResetError("reset by peer")), strategy="best_first", budget=Budget())
    assert r.status is Status.ERROR and any("reset by peer" in e for e in r.errors)


def test_a_buggy_generator_is_still_recorded_not_fatal() -> None:
    """Malformed answers and programming errors keep today's behaviour: recorded, no candidates."""
    env = GraphEnv(chain(3))
    gen = ScriptedGenerator(raise_on=["root"])
    r = search(THM, env, gen, strategy="best_first", budget=Budget())
    assert r.status is Status.FAILED and r.error_counts == {"generator_exception": 1}


def test_the_cause_is_kept_even_when_the_error_log_is_full() -> None:
    from search.runtime import MAX_ERROR_MESSAGES

    class NoisyThenDown:
        name = "noisy"
        calls = 0

        def propose(self, states, k, *, timeout_s=None):
            self.calls += 1
            if self.calls <= MAX_ERROR_MESSAGES + 2:
                return [[] for _ in states]  # recorded as generator_empty
            raise GeneratorError("endpoint down")

    edges = {f"s{i}": {f"t{i}": f"s{i + 1}"} for i in range(60)}
    edges["root"] = {"go": "s0"}
    env = GraphEnv(edges)
    r = search(THM, env, NoisyThenDown(), strategy="sampling", budget=Budget(max_passes=100, max_depth=2))
    assert r.status is Status.ERROR and any("endpoint down" in e for e in r.errors)


@pytest.mark.parametrize("strategy", ["best_first", "sampling"])
def test_a_stalled_model_ends_the_search_at_its_time_limit_with_timeout(strategy: str) -> None:
    env = GraphEnv(chain(3))
    gen = Stalling()
    budget = Budget(time_limit_s=0.5, tactic_timeout_s=0.2)
    started = time.monotonic()
    r = search(THM, env, gen, strategy=strategy, budget=budget)
    elapsed = time.monotonic() - started
    assert r.status is Status.TIMEOUT
    assert any("no answer from http://model:8000" in e for e in r.errors)
    assert 0.45 <= elapsed <= 0.5 + 0.2  # the limit, plus at most one tactic timeout
    assert len(gen.timeouts) == 1 and gen.timeouts[0] <= 0.5


def test_a_late_answer_is_dropped() -> None:
    """A generator that ignores the deadline answers too late: its candidates are not applied."""
    env = GraphEnv(chain(1))  # the root's one tactic proves the theorem
    gen = Recording([("t0", -0.1)], sleep_s=0.4)
    r = search(THM, env, gen, strategy="best_first", budget=Budget(time_limit_s=0.2))
    assert r.status is Status.TIMEOUT and r.lean_calls == 0
    assert r.error_counts.get("generator_late") == 1


def test_legacy_generators_without_timeout_still_work() -> None:
    env = GraphEnv(chain(2))
    gen = ScriptedGenerator(default=[("t0", -0.1), ("t1", -0.2)])
    r = search(THM, env, gen, strategy="best_first", budget=Budget())
    assert r.status is Status.PROVED


@pytest.mark.parametrize("mode", ["union", "mixture"])
def test_ensembles_report_a_member_error_not_failed(mode: str) -> None:
    env = GraphEnv(chain(3, closing=False))
    down = Recording([], error=GeneratorError("member b: connection refused"))
    down.name = "b"
    good = ScriptedGenerator(default=[("t0", -0.1), ("t1", -0.2), ("t2", -0.3)], name="a")
    r = search(THM, env, {"a": good, "b": down}, strategy="best_first", budget=Budget(max_expansions=5), ensemble=mode)
    assert r.status is Status.ERROR
    assert any("connection refused" in e for e in r.errors)
