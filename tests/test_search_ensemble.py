"""Ensembles: union (own budgets, stop at the first verified proof) and mixture (merged)."""

from __future__ import annotations

import time

import pytest
from search_doubles import QED, THEOREM, CachingEnv, GraphEnv, SamplingGenerator, ScriptedGenerator, chain

from search.budget import Budget
from search.ensemble import mixture, union
from search.engine import credited_member
from search.result import Status


def budget(**kw) -> Budget:
    base = dict(max_depth=20, time_limit_s=30.0, max_expansions=50, tactics_per_expansion=4, max_passes=20, tactic_timeout_s=5.0)
    base.update(kw)
    return Budget(**base)


def line(pp: str, tactic: str) -> object:
    """An endless line of states; `qed` closes the goal at state 3 only."""
    n = 0 if pp == "root" else int(pp)
    if tactic == "next":
        return str(n + 1)
    if tactic == "qed" and n == 3:
        return QED
    return None


@pytest.mark.parametrize("strategy", ["best_first", "sampling"])
def test_union_stops_every_member_at_the_first_proof_and_names_it(strategy: str) -> None:
    env = GraphEnv({}, successor=line)
    hopeless = ScriptedGenerator(default=[("next", -0.1)], name="hopeless")  # never closes
    if strategy == "best_first":
        solver = ScriptedGenerator(default=[("qed", -0.1), ("next", -0.2)], name="solver")
    else:  # sampling needs a generator that samples
        dist = {s: [("next", 0.5), ("qed", 0.5)] for s in ("root", "1", "2", "3")}
        solver = SamplingGenerator(dist, seed=1, name="solver")
    r = union(THEOREM, env, {"hopeless": hopeless, "solver": solver}, strategy=strategy, budget=budget())
    assert r.status is Status.PROVED and r.member == "solver"
    assert r.proof == ["next", "next", "next", "qed"] and r.verified
    assert r.members["solver"].status is Status.PROVED
    assert r.members["hopeless"].status is Status.CANCELLED
    # Interleaved: the hopeless member did no more steps than the solver before being stopped.
    steps = "expansions" if strategy == "best_first" else "passes"
    assert 0 < getattr(r.members["hopeless"], steps) <= getattr(r.members["solver"], steps)
    assert r.lean_calls == r.members["hopeless"].lean_calls + r.members["solver"].lean_calls
    assert r.expansions + r.passes == sum(m.expansions + m.passes for m in r.members.values())


def test_union_members_have_their_own_budget() -> None:
    env = GraphEnv({}, successor=line)
    gens = {name: ScriptedGenerator(default=[("next", -0.1)], name=name) for name in ("a", "b", "c")}
    r = union(THEOREM, env, gens, strategy="best_first", budget=budget(max_expansions=5))
    assert r.status is Status.BUDGET_EXHAUSTED
    assert [m.expansions for m in r.members.values()] == [5, 5, 5] and r.expansions == 15
    assert all(m.member == name for name, m in r.members.items())
    assert r.member is None


def test_union_cache_hits_across_members() -> None:
    env = CachingEnv(GraphEnv(chain(4, closing=False)))
    script = {"root": [("t0", -0.1)], "s1": [("t1", -0.1)], "s2": [("t2", -0.1)], "s3": [("t3", -0.1)]}
    gens = {"first": ScriptedGenerator(script, name="first"), "second": ScriptedGenerator(script, name="second")}
    r = union(THEOREM, env, gens, strategy="best_first", budget=budget())
    assert r.status is Status.FAILED
    first, second = r.members["first"], r.members["second"]
    assert first.cache_misses == 4 and first.cache_hits == 0
    assert second.cache_hits == 4 and second.cache_misses == 0  # every Lean result came from the first
    assert (r.cache_hits, r.cache_misses) == (4, 4)
    assert len(env.inner.calls) == 4


def test_union_each_member_has_its_own_clock() -> None:
    env = GraphEnv({}, successor=lambda pp, t: pp + "+", sleep_s=0.02)
    gens = {n: ScriptedGenerator(default=[("s", -1)], name=n) for n in ("a", "b")}
    start = time.monotonic()
    r = union(THEOREM, env, gens, strategy="best_first", budget=budget(time_limit_s=0.12, tactic_timeout_s=0.05, max_expansions=10**6, max_depth=10**6))
    took = time.monotonic() - start
    assert r.status is Status.TIMEOUT
    assert all(m.status is Status.TIMEOUT for m in r.members.values())
    # Each member's clock: its 0.12 s plus at most one tactic timeout (+ scheduling slack).
    assert all(0.12 <= m.wall_time_s <= 0.12 + 0.05 + 0.1 for m in r.members.values())
    assert took >= 0.24  # two members, each used its own 0.12 s
    assert r.wall_time_s >= sum(m.wall_time_s for m in r.members.values()) - 0.01


def test_union_reports_a_rejected_proof_as_failed() -> None:
    env = GraphEnv({"root": {"bad": QED}}, reject=[["bad"]])
    gens = {"a": ScriptedGenerator({"root": [("bad", -0.1)]}, name="a"), "b": ScriptedGenerator(name="b")}
    r = union(THEOREM, env, gens, strategy="best_first", budget=budget())
    assert r.status is Status.FAILED and r.proof == ["bad"] and not r.verified and r.member == "a"
    assert r.error_counts["verification_rejected"] == 1


def test_mixture_merges_candidates_by_score() -> None:
    edges = {"root": {"t1": "A", "t2": "B", "t3": "C"}, "A": {"q": QED}}
    env = GraphEnv(edges)
    a = ScriptedGenerator({"root": [("t1", -2.0), ("t3", -3.0)], "A": [("q", -0.1)]}, name="a")
    b = ScriptedGenerator({"root": [("t1", -0.5), ("t2", -1.0)], "A": [("q", -0.3)]}, name="b")
    r = mixture(THEOREM, env, {"a": a, "b": b}, strategy="best_first", budget=budget())
    assert [t for _, t, _ in env.calls[:3]] == ["t1", "t2", "t3"]  # merged, best first
    assert r.status is Status.PROVED and r.proof == ["t1", "q"]
    assert r.proof_members == ["b", "a"]  # t1's best score came from b, q's from a
    assert r.member == "a"  # one step each: the closing member wins the tie
    assert r.dropped_candidates == {"duplicate": 2}  # t1 and q proposed twice
    assert r.expansions == 2 and r.generator_calls == 4 and r.members == {}


def test_mixture_keeps_the_k_best() -> None:
    env = GraphEnv({"root": {}})
    a = ScriptedGenerator({"root": [("a1", -0.1), ("a2", -0.9)]}, name="a")
    b = ScriptedGenerator({"root": [("b1", -0.2), ("b2", -0.3)]}, name="b")
    r = mixture(THEOREM, env, {"a": a, "b": b}, strategy="best_first", budget=budget(tactics_per_expansion=2))
    assert [t for _, t, _ in env.calls] == ["a1", "b1"]
    assert r.dropped_candidates == {"mixture_cut": 2}


def test_mixture_sampling_draws_from_every_member() -> None:
    env = GraphEnv({"root": {"qa": QED}})
    a = ScriptedGenerator({"root": [("qa", -2.0)]}, name="a")
    b = ScriptedGenerator({"root": [("wrong", -0.1)]}, name="b")
    r = mixture(THEOREM, env, {"a": a, "b": b}, strategy="sampling", budget=budget(max_passes=100), seed=5)
    assert r.status is Status.PROVED and r.member == "a" and r.proof_members == ["a"]
    # Each step takes one member's sample uniformly (not re-weighted by probability):
    # "wrong" (e^-0.1) and "qa" (e^-2) are drawn about equally often.
    env = GraphEnv({"root": {}})
    mixture(THEOREM, env, {"a": a, "b": b}, strategy="sampling", budget=budget(max_passes=2000), seed=5)
    share = sum(t == "wrong" for _, t, _ in env.calls) / len(env.calls)
    assert 0.45 < share < 0.55


def test_credited_member_rules() -> None:
    assert credited_member(["a", "b", "b"]) == "b"
    assert credited_member(["a", "a", "b"]) == "a"
    assert credited_member(["a", "b"]) == "b"
    assert credited_member([]) is None


def test_bad_ensembles_raise() -> None:
    with pytest.raises(ValueError, match="at least one"):
        union(THEOREM, GraphEnv({}), {}, strategy="best_first", budget=budget())
    with pytest.raises(TypeError, match="not a TacticGenerator"):
        mixture(THEOREM, GraphEnv({}), {"x": object()}, strategy="best_first", budget=budget())
    with pytest.raises(ValueError, match="unknown strategy"):
        union(THEOREM, GraphEnv({}), {"x": ScriptedGenerator()}, strategy="dfs", budget=budget())  # type: ignore[arg-type]
