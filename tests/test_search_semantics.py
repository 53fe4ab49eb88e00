"""Issue 13's search semantics: shortest depth wins in the transposition table, the
paper's one-sample-per-step protocol, distinct trajectories, per-stream seeds, first
successful pass."""

from __future__ import annotations

from collections import Counter

from search_doubles import QED, THEOREM, GraphEnv, SamplingGenerator, ScriptedGenerator

from search.best_first import best_first_search
from search.budget import Budget
from search.result import SearchResult, Status
from search.sampling import sampling_search, stream_seed
from search.types import Candidate


def bf_budget(**kw) -> Budget:
    base = dict(max_depth=50, time_limit_s=60.0, max_expansions=1000, tactics_per_expansion=8, tactic_timeout_s=5.0)
    base.update(kw)
    return Budget(**base)


def deep_then_shallow() -> tuple[GraphEnv, ScriptedGenerator]:
    """X is first reached at depth 49 by a high-scoring chain a1..a48, later at depth 2 via
    b1; from X a 14-step tail closes the goal: 16 steps via b1, 63 via the a-chain."""
    edges: dict[str, dict[str, object]] = {"root": {"a": "a1", "b": "b1"}}
    script: dict[str, list[tuple[str, float]]] = {"root": [("a", -0.01), ("b", -5.0)]}
    for i in range(1, 48):
        edges[f"a{i}"] = {"next": f"a{i + 1}"}
        script[f"a{i}"] = [("next", -0.01)]
    edges["a48"] = {"toX": "X"}
    script["a48"] = [("toX", -0.01)]
    edges["b1"] = {"toX": "X"}
    script["b1"] = [("toX", -0.01)]
    tail = ["X"] + [f"y{i}" for i in range(1, 14)]
    for i, state in enumerate(tail):
        edges[state] = {"go": tail[i + 1] if i + 1 < len(tail) else QED}
        script[state] = [("go", -0.01)]
    return GraphEnv(edges), ScriptedGenerator(script)


def test_a_state_reached_shallower_takes_the_smaller_depth_and_its_subtree_is_unblocked() -> None:
    env, gen = deep_then_shallow()
    r = best_first_search(THEOREM, env, gen, bf_budget(max_depth=50))
    assert r.status is Status.PROVED, r
    assert r.proof == ["b", "toX"] + ["go"] * 14
    assert len(r.proof) == 16 <= 50


def test_shortened_depths_keep_the_path_invariant() -> None:
    from search.best_first import BestFirstSearch
    from search.proposer import SingleProposer
    from search.runtime import SearchContext
    from search.tactic_filter import TacticFilter

    env, gen = deep_then_shallow()
    ctx = SearchContext(env, THEOREM, bf_budget(max_depth=50), tactic_filter=TacticFilter())
    engine = BestFirstSearch(ctx, env.start(THEOREM), SingleProposer(gen.name, gen, ctx))
    r = engine.run()
    assert r.proved
    for node in engine.table.values():
        tactics, _ = node.path()
        assert len(tactics) == node.depth
    assert engine.table["X"].depth == 2 and engine.table["y1"].depth == 3


def test_one_sample_per_step_follows_the_model_distribution_not_its_square() -> None:
    # p(bad) = 0.8, p(qed) = 0.2. Taking one of k samples uniformly keeps p; re-weighting the
    # k samples by p (the old behaviour) picks "bad" ~0.94 of the time with k = 4.
    dist = {"root": [("bad", 0.8), ("good", 0.2)]}
    env = GraphEnv({"root": {}})
    sampling_search(THEOREM, env, SamplingGenerator(dist, seed=5), Budget(max_passes=3000, max_depth=5), samples_per_step=4, seed=2)
    share = Counter(t for _, t, _ in env.calls)["bad"] / len(env.calls)
    assert 0.77 < share < 0.83, share


def test_one_of_k_keeps_the_deadline_contract_for_old_and_new_generators() -> None:
    # The one-of-k view passes `timeout_s` to a generator that takes it and leaves it out
    # for one written before the keyword existed; either way the pass proves the theorem.
    class Old:
        name = "old"

        def propose(self, states, k):
            return [[Candidate("qed", -0.1)] * k for _ in states]

    class New(Old):
        name = "new"
        seen: list = []

        def propose(self, states, k, *, timeout_s=None):
            self.seen.append(timeout_s)
            return super().propose(states, k)

    for gen in (Old(), New()):
        r = sampling_search(THEOREM, GraphEnv({"root": {"qed": QED}}), gen, Budget(max_passes=2, time_limit_s=30), samples_per_step=4)
        assert r.proved and not any("generator_exception" in e for e in r.errors), r.errors
    assert New.seen and all(t is not None and 0 < t <= 30 for t in New.seen)


def test_deterministic_generator_reports_one_distinct_trajectory() -> None:
    env = GraphEnv({"root": {"step": "s1"}, "s1": {}})
    gen = ScriptedGenerator(default=[("step", -0.1)])
    r = sampling_search(THEOREM, env, gen, Budget(max_passes=20, max_depth=5))
    assert r.passes == 20 and r.distinct_trajectories == 1
    varied = SamplingGenerator({"root": [("a", 0.5), ("b", 0.5)]}, seed=1)
    r = sampling_search(THEOREM, GraphEnv({"root": {}}), varied, Budget(max_passes=20, max_depth=5))
    assert r.distinct_trajectories == 2
    assert SearchResult.from_json(r.to_json()).distinct_trajectories == 2


def test_first_successful_pass_is_recorded() -> None:
    dist = {"root": [("bad", 0.9), ("qed", 0.1)]}
    r = sampling_search(THEOREM, GraphEnv({"root": {"qed": QED}}), SamplingGenerator(dist, seed=3), Budget(max_passes=500))
    assert r.proved and r.first_success_pass == r.passes


def test_first_successful_pass_is_the_lowest_index_with_parallel_passes() -> None:
    # Pass 1 needs 3 steps, pass 2 one step: in lockstep pass 2 succeeds first, but pass 1
    # also succeeds: the first successful pass is 1 (pass@1 must count it).
    class Gen:
        name = "g"

        def __init__(self) -> None:
            self.n = 0

        def propose(self, states, k):
            out = []
            for state in states:
                if state == "root":
                    self.n += 1
                    out.append([__import__("search.types", fromlist=["Candidate"]).Candidate("long" if self.n == 1 else "qed", -0.5)])
                else:
                    out.append([__import__("search.types", fromlist=["Candidate"]).Candidate("go", -0.5)])
            return out

    env = GraphEnv({"root": {"long": "l1", "qed": QED}, "l1": {"go": "l2"}, "l2": {"go": QED}})
    r = sampling_search(THEOREM, env, Gen(), Budget(max_passes=10), parallel_passes=2)
    assert r.proved and r.first_success_pass == 1 and r.proof == ["long", "go", "go"]


def test_stream_seed_depends_on_its_parts_only() -> None:
    assert stream_seed(0, "thm", "m") == stream_seed(0, "thm", "m")
    assert len({stream_seed(0, "thm", "m"), stream_seed(1, "thm", "m"), stream_seed(0, "thm2", "m"), stream_seed(0, "thm", "m2")}) == 4
    assert 0 <= stream_seed(0, "x") < 2**63


def test_shared_ensemble_splits_one_budget_and_independent_is_union() -> None:
    from search.api import search

    gens = {name: ScriptedGenerator({"root": [("bad", -0.1)]}, name=name) for name in ("a", "b", "c")}
    r = search(THEOREM, GraphEnv({"root": {}}), gens, strategy="sampling", budget=Budget(max_passes=10, time_limit_s=30.0), ensemble="shared")
    assert r.passes == 10 and [m.passes for m in r.members.values()] == [4, 3, 3]
    assert [m for m in r.members] == ["a", "b", "c"]
    r = search(THEOREM, GraphEnv({"root": {}}), gens, strategy="sampling", budget=Budget(max_passes=2), ensemble="shared")
    assert r.passes == 2 and list(r.members) == ["a", "b"]  # c got no pass: it does not search
    for mode in ("independent", "union"):
        r = search(THEOREM, GraphEnv({"root": {}}), gens, strategy="sampling", budget=Budget(max_passes=10), ensemble=mode)
        assert r.passes == 30


def test_budget_split_and_scale_are_exact() -> None:
    b = Budget(max_passes=7, max_expansions=5, time_limit_s=90.0)
    parts = b.split(3)
    assert [p.max_passes for p in parts] == [3, 2, 2] and all(p.time_limit_s == 30.0 for p in parts)
    assert [p is None for p in b.split(6, "max_expansions")] == [False] * 5 + [True]
    big = b.scaled(5)
    assert (big.max_passes, big.max_expansions, big.time_limit_s, big.max_depth) == (35, 25, 450.0, b.max_depth)


def test_all_passes_counts_successful_passes_and_keeps_the_lowest_pass_proof() -> None:
    dist = {"root": [("bad", 0.7), ("qed", 0.3)]}
    env = GraphEnv({"root": {"qed": QED}})
    r = sampling_search(THEOREM, env, SamplingGenerator(dist, seed=4), Budget(max_passes=400), all_passes=True)
    assert r.proved and r.passes == 400 and r.proof == ["qed"]
    assert 90 < r.successful_passes < 150  # ~ 0.3 × 400
    assert r.first_success_pass <= 400 - r.successful_passes + 1
    assert env.verify_calls == [["qed"]]  # a proof verified once is not re-checked
    r = sampling_search(THEOREM, GraphEnv({"root": {}}), SamplingGenerator(dist, seed=4), Budget(max_passes=20), all_passes=True)
    assert r.status is Status.BUDGET_EXHAUSTED and r.successful_passes == 0
