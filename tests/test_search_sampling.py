"""pass@N sampling: exact pass counts, depth cap, shared cache, lockstep batches, budgets."""

from __future__ import annotations

import threading
import time

from search_doubles import QED, THEOREM, CachingEnv, GraphEnv, SamplingGenerator, ScriptedGenerator, chain

from search.budget import Budget
from search.result import Status
from search.sampling import sampling_search


def budget(**kw) -> Budget:
    base = dict(max_depth=50, time_limit_s=30.0, max_passes=16, tactic_timeout_s=5.0)
    base.update(kw)
    return Budget(**base)


def test_failing_tactics_use_exactly_max_passes() -> None:
    env = GraphEnv({"root": {}})
    gen = ScriptedGenerator({"root": [("bad", -0.1)]})
    r = sampling_search(THEOREM, env, gen, budget(max_passes=7))
    assert r.status is Status.BUDGET_EXHAUSTED
    assert r.passes == 7 and r.lean_calls == 7 and r.generator_calls == 7
    assert r.expansions == 0
    assert all(k == 1 for _, k in gen.calls)  # the paper's protocol: one sampled tactic per step


def test_depth_cap_ends_each_pass() -> None:
    env = GraphEnv({}, successor=lambda pp, t: pp + "+")
    r = sampling_search(THEOREM, env, ScriptedGenerator(default=[("step", -0.1)]), budget(max_passes=3, max_depth=4))
    assert r.status is Status.BUDGET_EXHAUSTED
    assert r.lean_calls == 12 and r.max_depth_reached == 4
    assert max(len(pp) for pp, _, _ in env.calls) == len("root") + 3  # the state at depth 4 is never stepped


def test_proof_of_exactly_max_depth_is_found_and_longer_is_not() -> None:
    for max_depth, proved in ((3, True), (2, False)):
        env = GraphEnv(chain(3))
        gen = ScriptedGenerator({"root": [("t0", -0.1)], "s1": [("t1", -0.1)], "s2": [("t2", -0.1)]})
        r = sampling_search(THEOREM, env, gen, budget(max_passes=2, max_depth=max_depth))
        assert r.proved is proved
        assert r.max_depth_reached <= max_depth
        if proved:
            assert r.proof == ["t0", "t1", "t2"] and r.passes == 1 and env.verify_calls == [r.proof]


def test_sampled_proof_verified_and_passes_share_the_cache() -> None:
    # At each state the right tactic has probability 0.5; a pass proves with prob 1/8.
    edges = {"root": {"a": "A"}, "A": {"b": "B"}, "B": {"c": QED}}
    dist = {"root": [("a", 0.5), ("x", 0.5)], "A": [("b", 0.5), ("y", 0.5)], "B": [("c", 0.5), ("z", 0.5)]}
    env = CachingEnv(GraphEnv(edges))
    r = sampling_search(THEOREM, env, SamplingGenerator(dist, seed=3), budget(max_passes=200))
    assert r.status is Status.PROVED and r.proof == ["a", "b", "c"] and r.verified
    assert r.passes <= 200
    assert r.cache_hits + r.cache_misses == r.lean_calls
    assert r.cache_misses <= 6  # only 6 distinct (state, tactic) pairs exist
    assert r.cache_hits == r.lean_calls - r.cache_misses and r.cache_hits > 0


def test_proof_on_the_last_pass_counts() -> None:
    # The generator walks a wrong tactic for passes 1-4 and the right one on pass 5.
    class Scheduled:
        name = "scheduled"

        def __init__(self):
            self.root_calls = 0

        def propose(self, states, k):
            from search.types import Candidate

            self.root_calls += 1
            return [[Candidate("qed" if self.root_calls == 5 else "bad", -0.1)] for _ in states]

    env = GraphEnv({"root": {"qed": QED}})
    r = sampling_search(THEOREM, env, Scheduled(), budget(max_passes=5))
    assert r.status is Status.PROVED and r.passes == 5
    r = sampling_search(THEOREM, GraphEnv({"root": {"qed": QED}}), Scheduled(), budget(max_passes=4))
    assert r.status is Status.BUDGET_EXHAUSTED and r.passes == 4


def test_samples_per_step_takes_one_sample_uniformly_and_is_seeded() -> None:
    # A deterministic generator always ranks "bad" first; drawing among 2 samples finds "qed".
    env = GraphEnv({"root": {"qed": QED}})
    gen = ScriptedGenerator({"root": [("bad", -0.5), ("qed", -1.0)]})
    r1 = sampling_search(THEOREM, env, gen, budget(max_passes=50), samples_per_step=2, seed=11)
    assert r1.status is Status.PROVED and all(k == 2 for _, k in gen.calls)
    r2 = sampling_search(THEOREM, GraphEnv({"root": {"qed": QED}}), gen, budget(max_passes=50), samples_per_step=2, seed=11)
    assert r2.passes == r1.passes  # same seed, same draws
    # One of the k answers uniformly (the paper's one sample per step), never re-weighted by
    # probability: a deterministic generator's two tactics are chosen half the time each.
    env = GraphEnv({"root": {}})
    sampling_search(THEOREM, env, gen, budget(max_passes=2000), samples_per_step=2, seed=1)
    share = sum(t == "bad" for _, t, _ in env.calls) / len(env.calls)
    assert 0.45 < share < 0.55


def test_parallel_passes_batch_the_generator_and_count_exactly() -> None:
    env = GraphEnv({}, successor=lambda pp, t: pp + "+" if t == "step" else None)
    gen = ScriptedGenerator(default=[("step", -0.1)])
    r = sampling_search(THEOREM, env, gen, budget(max_passes=10, max_depth=3), parallel_passes=4)
    assert r.status is Status.BUDGET_EXHAUSTED and r.passes == 10
    assert r.lean_calls == 30
    sizes = [len(states) for states, _ in gen.calls]
    assert max(sizes) == 4 and sum(sizes) == 30


def test_forbidden_sample_ends_the_pass_without_reaching_lean() -> None:
    env = GraphEnv({"root": {"sorry": QED}})
    r = sampling_search(THEOREM, env, ScriptedGenerator({"root": [("sorry", -0.1)]}), budget(max_passes=3))
    assert r.status is Status.BUDGET_EXHAUSTED and r.lean_calls == 0 and env.calls == []
    assert r.dropped_candidates == {"forbidden": 3}


def test_generator_errors_and_empty_lists_end_passes_and_are_recorded() -> None:
    r = sampling_search(THEOREM, GraphEnv({}), ScriptedGenerator(raise_on=["root"]), budget(max_passes=3))
    assert r.status is Status.BUDGET_EXHAUSTED and r.passes == 3 and r.error_counts == {"generator_exception": 3}
    r = sampling_search(THEOREM, GraphEnv({}), ScriptedGenerator(), budget(max_passes=2))
    assert r.error_counts == {"generator_empty": 2}


def test_wall_clock_limit_and_cancel() -> None:
    env = GraphEnv({}, successor=lambda pp, t: pp + "+", sleep_s=0.03)
    start = time.monotonic()
    r = sampling_search(THEOREM, env, ScriptedGenerator(default=[("s", -1)]), budget(time_limit_s=0.2, tactic_timeout_s=0.1, max_passes=10**6))
    assert r.status is Status.TIMEOUT and time.monotonic() - start <= 0.2 + 0.1 + 0.05

    event = threading.Event()

    def progress(payload):
        if payload["passes"] >= 3:
            event.set()

    env = GraphEnv({"root": {}})
    r = sampling_search(THEOREM, env, ScriptedGenerator(default=[("s", -1)]), budget(max_passes=100), progress=progress, cancel=event)
    assert r.status is Status.CANCELLED and r.passes == 3


def test_rejected_sampled_proof_ends_the_pass_only() -> None:
    env = GraphEnv({"root": {"bad": QED, "good": QED}}, reject=[["bad"]])

    class Alternating:
        name = "alt"
        n = 0

        def propose(self, states, k):
            from search.types import Candidate

            self.n += 1
            return [[Candidate("bad" if self.n == 1 else "good", -0.1)]]

    r = sampling_search(THEOREM, env, Alternating(), budget(max_passes=5))
    assert r.status is Status.PROVED and r.proof == ["good"] and r.passes == 2
    assert r.error_counts == {"verification_rejected": 1}
