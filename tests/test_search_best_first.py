"""Best-first search: ordering, transpositions, failure propagation, depth cap, budgets."""

from __future__ import annotations

import threading
import time

import pytest
from search_doubles import QED, THEOREM, CachingEnv, GraphEnv, ScriptedGenerator, chain

from search.best_first import BestFirstSearch, best_first_search
from search.budget import Budget
from search.proposer import SingleProposer
from search.result import Status
from search.runtime import SearchContext
from search.tactic_filter import TacticFilter
from search.types import Failed, FailureKind


def budget(**kw) -> Budget:
    base = dict(max_depth=50, time_limit_s=30.0, max_expansions=100, tactics_per_expansion=8, tactic_timeout_s=5.0)
    base.update(kw)
    return Budget(**base)


def engine(env, gen, b: Budget, **kw) -> BestFirstSearch:
    ctx = SearchContext(env, THEOREM, b, tactic_filter=TacticFilter(), progress=kw.pop("progress", None), cancel=kw.pop("cancel", None))
    return BestFirstSearch(ctx, env.start(THEOREM), SingleProposer(gen.name, gen, ctx), **kw)


def test_proves_a_chain_and_verifies_with_exact_counts() -> None:
    env = GraphEnv(chain(3))
    gen = ScriptedGenerator({"root": [("t0", -0.1), ("bad", -1.0)], "s1": [("t1", -0.2)], "s2": [("t2", -0.3)]})
    r = best_first_search(THEOREM, env, gen, budget())
    assert r.status is Status.PROVED and r.verified and r.proved
    assert r.proof == ["t0", "t1", "t2"]
    assert env.verify_calls == [["t0", "t1", "t2"]]
    assert r.expansions == 3 and r.generator_calls == 3
    assert r.lean_calls == 4 == len(env.calls)  # t0, bad, t1, t2
    assert r.cache_hits == 0 and r.cache_misses == 4
    assert r.max_depth_reached == 3
    assert r.member == "scripted" and r.proof_members == ["scripted"] * 3
    assert r.wall_time_s >= 0 and r.lean_time_s >= 0 and r.generator_time_s >= 0


def test_candidates_applied_in_descending_score_and_best_node_first() -> None:
    edges = {"root": {"a": "A", "b": "B", "c": "C"}, "B": {"x": QED}}
    env = GraphEnv(edges)
    gen = ScriptedGenerator({"root": [("c", -3.0), ("a", -1.0), ("b", -2.0), ("a", -0.5)], "B": [("x", -0.1)]})
    r = best_first_search(THEOREM, env, gen, budget())
    assert [t for _, t, _ in env.calls[:3]] == ["a", "b", "c"]
    # A (score -0.5) is expanded before B (-2.0); C (-3.0) never.
    assert gen.states_asked == ["root", "A", "B"]
    assert r.proof == ["b", "x"] and r.status is Status.PROVED
    assert r.dropped_candidates == {"duplicate": 1}


def test_transpositions_are_one_node_and_cycles_terminate() -> None:
    # root -> A, root -> B, A -> B (transposition), B -> A (cycle), B -> root (cycle).
    edges = {"root": {"a": "A", "b": "B"}, "A": {"ab": "B", "aa": "A"}, "B": {"ba": "A", "br": "root"}}
    env = GraphEnv(edges)
    gen = ScriptedGenerator({s: [(t, -1.0) for t in out] for s, out in edges.items()})
    e = engine(env, gen, budget())
    r = e.run()
    assert r.status is Status.FAILED  # space exhausted, no proof
    assert e.nodes == 3
    assert r.expansions == 3  # each distinct state expanded exactly once
    assert sorted(gen.states_asked) == ["A", "B", "root"]
    assert len(e.table["B"].parents) == 2  # reached from root and from A: one node


def test_failure_propagates_through_a_shared_child() -> None:
    # root -> A, root -> B; A -> C, B -> C; C's only tactic fails: C, A, B and root fail.
    edges = {"root": {"a": "A", "b": "B"}, "A": {"c": "C"}, "B": {"c": "C"}, "C": {}}
    env = GraphEnv(edges)
    gen = ScriptedGenerator({"root": [("a", -1), ("b", -2)], "A": [("c", -1)], "B": [("c", -1)], "C": [("x", -1)]})
    e = engine(env, gen, budget())
    r = e.run()
    assert r.status is Status.FAILED
    assert all(e.table[s].failed for s in ("root", "A", "B", "C"))
    assert {p.state.pp for p in e.table["C"].parents} == {"A", "B"}


def test_a_parent_with_a_live_child_does_not_fail() -> None:
    # C (shared by A and B) fails. A also has D, whose child E sits at the depth cap (never
    # expanded, never failed), so A and the root stay open while B (only C) fails.
    edges = {"root": {"a": "A", "b": "B"}, "A": {"c": "C", "d": "D"}, "B": {"c": "C"}, "C": {}, "D": {"e": "E"}}
    env = GraphEnv(edges)
    gen = ScriptedGenerator(
        {"root": [("a", -1), ("b", -2)], "A": [("c", -1), ("d", -1)], "B": [("c", -1)], "C": [("x", -1)], "D": [("e", -1)]}
    )
    e = engine(env, gen, budget(max_depth=3))
    r = e.run()
    assert r.status is Status.FAILED  # no open node left
    assert e.table["C"].failed and e.table["B"].failed
    assert not e.table["A"].failed and not e.table["D"].failed and not e.table["root"].failed
    assert not e.table["E"].expanded and not e.table["E"].failed  # depth 3 == cap
    assert {p.state.pp for p in e.table["C"].parents} == {"A", "B"}


def test_root_failure_ends_the_search_before_the_budget() -> None:
    env = GraphEnv({"root": {}})
    gen = ScriptedGenerator({"root": [("x", -1), ("y", -2)]})
    e = engine(env, gen, budget(max_expansions=50))
    r = e.run()
    assert r.status is Status.FAILED and r.expansions == 1 and e.root.failed


def infinite_line(pp: str, tactic: str) -> object:
    """root -> 1 -> 2 -> ...; `next` advances, `qed` closes only at depth 5."""
    n = 0 if pp == "root" else int(pp)
    if tactic == "next":
        return str(n + 1)
    if tactic == "qed" and n == 5:
        return QED
    return None


@pytest.mark.parametrize("max_depth,proved", [(4, False), (5, False), (6, True), (7, True)])
def test_depth_cap_never_exceeded_and_capped_nodes_not_expanded(max_depth: int, proved: bool) -> None:
    env = GraphEnv({}, successor=infinite_line)
    gen = ScriptedGenerator(default=[("next", -0.1), ("qed", -0.2)])
    r = best_first_search(THEOREM, env, gen, budget(max_depth=max_depth, max_expansions=1000))
    # The proof has 6 tactics (5 x next, qed): found iff the cap allows 6 steps.
    assert r.status is (Status.PROVED if proved else Status.FAILED)
    assert r.max_depth_reached <= max_depth
    asked = [0 if s == "root" else int(s) for s in gen.states_asked]
    assert max(asked) < max_depth  # nodes at the cap are never expanded
    if proved:
        assert r.proof == ["next"] * 5 + ["qed"] and r.max_depth_reached == 6
    else:
        assert r.expansions == max_depth  # depths 0 .. max_depth-1, once each


def test_capped_node_reached_again_by_a_shorter_path_is_expanded() -> None:
    # X is first found at depth 3 (= cap) via the high-scoring a-b path, then at depth 2 via c.
    edges = {"root": {"a": "A", "c": "C"}, "A": {"b": "B"}, "B": {"x": "X"}, "C": {"x2": "X"}, "X": {"q": QED}}
    env = GraphEnv(edges)
    gen = ScriptedGenerator(
        {"root": [("a", -0.1), ("c", -3.0)], "A": [("b", -0.1)], "B": [("x", -0.1)], "C": [("x2", -0.1)], "X": [("q", -0.1)]}
    )
    r = best_first_search(THEOREM, env, gen, budget(max_depth=3))
    assert r.status is Status.PROVED
    assert r.proof == ["c", "x2", "q"]
    assert gen.states_asked == ["root", "A", "B", "C", "X"]


def test_length_normalisation_prefers_deeper_nodes() -> None:
    edges = {"root": {"a": "A", "c": "C"}, "A": {"b": "B"}, "B": {}, "C": {}}
    gen_script = {"root": [("a", -1.0), ("c", -1.5)], "A": [("b", -1.0)], "B": [("z", -1)], "C": [("z", -1)]}
    plain = ScriptedGenerator(gen_script)
    best_first_search(THEOREM, GraphEnv(edges), plain, budget())
    assert plain.states_asked == ["root", "A", "C", "B"]  # B: -2.0 < C: -1.5
    normalised = ScriptedGenerator(gen_script)
    best_first_search(THEOREM, GraphEnv(edges), normalised, budget(), length_alpha=1.0)
    assert normalised.states_asked == ["root", "A", "B", "C"]  # B: -2.0/2 = -1.0 > C: -1.5


def test_expansion_budget_is_exact_and_last_expansion_proof_counts() -> None:
    def line(pp, tactic):
        n = 0 if pp == "root" else int(pp)
        return str(n + 1) if tactic == "next" else (QED if tactic == "qed" and n == 3 else None)

    gen = ScriptedGenerator(default=[("next", -0.1), ("qed", -0.2), ("bad", -0.3)])
    env = GraphEnv({}, successor=line)
    r = best_first_search(THEOREM, env, gen, budget(max_expansions=3))
    assert r.status is Status.BUDGET_EXHAUSTED
    assert r.expansions == 3 == r.generator_calls == len(gen.calls)
    assert r.lean_calls == 9 <= r.expansions * 3
    # The proof needs exactly 4 expansions (depths 0..3): found on the last one allowed.
    env = GraphEnv({}, successor=line)
    r = best_first_search(THEOREM, env, ScriptedGenerator(default=[("next", -0.1), ("qed", -0.2)]), budget(max_expansions=4))
    assert r.status is Status.PROVED and r.expansions == 4 and r.proof == ["next"] * 3 + ["qed"]


def test_more_candidates_than_k_are_cut_and_counted() -> None:
    gen = ScriptedGenerator()
    gen.propose = lambda states, k: [[c for c in ScriptedGenerator(default=[(f"t{i}", -i) for i in range(6)]).propose(states, 99)[0]]]
    env = GraphEnv({"root": {}})
    r = best_first_search(THEOREM, env, gen, budget(tactics_per_expansion=4))
    assert r.lean_calls == 4 and [t for _, t, _ in env.calls] == ["t0", "t1", "t2", "t3"]
    assert r.dropped_candidates == {"over_k": 2}


def test_wall_clock_limit_with_a_slow_environment() -> None:
    def line(pp, tactic):
        return str((0 if pp == "root" else int(pp)) + 1)

    tactic_timeout = 0.1
    env = GraphEnv({}, successor=line, sleep_s=0.04)
    gen = ScriptedGenerator(default=[("a", -0.1), ("b", -0.2)])
    start = time.monotonic()
    r = best_first_search(THEOREM, env, gen, budget(time_limit_s=0.3, tactic_timeout_s=tactic_timeout, max_expansions=10**6))
    took = time.monotonic() - start
    assert r.status is Status.TIMEOUT
    assert took <= 0.3 + tactic_timeout + 0.05  # overshoot at most one tactic timeout (+ scheduling slack)
    assert r.wall_time_s <= 0.3 + tactic_timeout + 0.05
    assert all(timeout is not None and 0 < timeout <= tactic_timeout for _, _, timeout in env.calls)


def test_tactic_timeout_passed_is_capped_by_the_remaining_time() -> None:
    env = GraphEnv({}, successor=lambda pp, t: pp + "x", sleep_s=5.0)  # every call runs to its timeout
    gen = ScriptedGenerator(default=[("a", -0.1)])
    start = time.monotonic()
    r = best_first_search(THEOREM, env, gen, budget(time_limit_s=0.25, tactic_timeout_s=10.0))
    assert time.monotonic() - start < 0.25 + 0.1
    assert r.status is Status.TIMEOUT
    assert env.calls[0][2] <= 0.25
    assert r.error_counts.get("env_timeout", 0) >= 1


def test_proof_returned_after_the_deadline_by_a_call_started_before_is_proved() -> None:
    gen = ScriptedGenerator({"root": [("slowqed", -0.1)]})
    # An environment that honours the timeout it is given (min(1.0, ~0.1 s left)) times out:
    env = GraphEnv({"root": {"slowqed": QED}}, sleep_s=0.15)
    r = best_first_search(THEOREM, env, gen, budget(time_limit_s=0.1, tactic_timeout_s=1.0))
    assert r.status is Status.TIMEOUT and r.error_counts == {"env_timeout": 1}
    # One that answers the proof late, after the deadline passed, still gets it reported.
    env = GraphEnv({"root": {"slowqed": QED}}, sleep_s=0.15, honour_timeout=False)
    r = best_first_search(THEOREM, env, gen, budget(time_limit_s=0.1, tactic_timeout_s=1.0))
    assert r.status is Status.PROVED and r.proof == ["slowqed"] and r.wall_time_s > 0.1


def test_generator_exceptions_are_recorded_and_other_branches_continue() -> None:
    edges = {"root": {"a": "A", "b": "B"}, "A": {"x": QED}, "B": {"y": QED}}
    gen = ScriptedGenerator({"root": [("a", -0.1), ("b", -0.2)], "B": [("y", -0.1)]}, raise_on=["A"])
    r = best_first_search(THEOREM, GraphEnv(edges), gen, budget())
    assert r.status is Status.PROVED and r.proof == ["b", "y"]
    assert r.error_counts == {"generator_exception": 1}
    assert "model failed on 'A'" in r.errors[0]
    assert r.expansions == 3


def test_generator_raising_on_the_root_fails_cleanly() -> None:
    gen = ScriptedGenerator(raise_on=["root"])
    r = best_first_search(THEOREM, GraphEnv({}), gen, budget())
    assert r.status is Status.FAILED and r.expansions == 1 and r.lean_calls == 0
    assert r.error_counts == {"generator_exception": 1}


def test_empty_and_malformed_candidates_are_recorded() -> None:
    r = best_first_search(THEOREM, GraphEnv({}), ScriptedGenerator({"root": []}), budget())
    assert r.status is Status.FAILED and r.error_counts == {"generator_empty": 1}
    r = best_first_search(THEOREM, GraphEnv({}), ScriptedGenerator(answer=[[], []]), budget())
    assert r.error_counts == {"generator_invalid": 1} and "returned 2 lists" in r.errors[0]
    r = best_first_search(THEOREM, GraphEnv({}), ScriptedGenerator(answer="nonsense"), budget())
    assert r.error_counts == {"generator_invalid": 1}
    r = best_first_search(THEOREM, GraphEnv({}), ScriptedGenerator(answer=[[("rfl", -1.0)]]), budget())
    assert r.error_counts == {"generator_invalid": 1} and r.dropped_candidates == {"invalid": 1}


def test_forbidden_tactics_never_reach_the_environment() -> None:
    edges = {"root": {"sorry": QED, "exact sorry": QED, "native_decide": QED, "rfl": QED}}
    env = GraphEnv(edges)
    gen = ScriptedGenerator({"root": [("sorry", -0.01), ("exact sorry", -0.02), ("native_decide", -0.03), ("rfl", -5.0)]})
    r = best_first_search(THEOREM, env, gen, budget())
    assert [t for _, t, _ in env.calls] == ["rfl"]
    assert r.status is Status.PROVED and r.proof == ["rfl"]
    assert r.dropped_candidates == {"forbidden": 3}
    # A custom filter is honoured.
    env = GraphEnv(edges)
    r = best_first_search(THEOREM, env, gen, budget(), tactic_filter=TacticFilter(forbidden=("sorry", "rfl")))
    assert [t for _, t, _ in env.calls] == ["native_decide"] and r.proof == ["native_decide"]


def test_environment_exceptions_and_crashes_are_recorded_not_raised() -> None:
    edges = {
        "root": {"boom": OSError("pipe closed"), "crash": Failed(FailureKind.CRASH, "repl died"), "ok": "A"},
        "A": {"q": QED},
    }
    gen = ScriptedGenerator({"root": [("boom", -0.1), ("crash", -0.2), ("ok", -0.3)], "A": [("q", -0.1)]})
    r = best_first_search(THEOREM, GraphEnv(edges), gen, budget())
    assert r.status is Status.PROVED
    assert r.error_counts == {"env_exception": 1, "env_crash": 1}
    assert any("pipe closed" in e for e in r.errors)


def test_invalid_environment_answers_are_crashes() -> None:
    class Weird(GraphEnv):
        def apply(self, state, tactic, timeout_s=None):
            return "not a result"

    r = best_first_search(THEOREM, Weird({}), ScriptedGenerator({"root": [("x", -1)]}), budget())
    assert r.status is Status.FAILED and r.error_counts == {"env_invalid_result": 1}


def test_rejected_proof_search_continues_to_a_verified_one() -> None:
    edges = {"root": {"bad": QED, "a": "A"}, "A": {"good": QED}}
    env = GraphEnv(edges, reject=[["bad"]])
    gen = ScriptedGenerator({"root": [("bad", -0.1), ("a", -0.2)], "A": [("good", -0.1)]})
    r = best_first_search(THEOREM, env, gen, budget())
    assert r.status is Status.PROVED and r.proof == ["a", "good"] and r.verified
    assert env.verify_calls == [["bad"], ["a", "good"]]
    assert r.error_counts == {"verification_rejected": 1}


def test_only_a_rejected_proof_gives_failed_with_the_proof() -> None:
    env = GraphEnv({"root": {"bad": QED}}, reject=[["bad"]])
    r = best_first_search(THEOREM, env, ScriptedGenerator({"root": [("bad", -0.1)]}), budget())
    assert r.status is Status.FAILED and not r.verified
    assert r.proof == ["bad"] and r.verification_message == "uses a forbidden axiom"


def test_verification_exception_is_a_rejection() -> None:
    class Broken(GraphEnv):
        def verify(self, theorem, tactics):
            raise RuntimeError("checker down")

    r = best_first_search(THEOREM, Broken({"root": {"q": QED}}), ScriptedGenerator({"root": [("q", -1)]}), budget())
    assert r.status is Status.FAILED and "checker down" in r.verification_message


def test_cancel_before_and_during_the_search() -> None:
    event = threading.Event()
    event.set()
    env = GraphEnv({}, successor=lambda pp, t: pp + "x")
    r = best_first_search(THEOREM, env, ScriptedGenerator(default=[("a", -1)]), budget(), cancel=event)
    assert r.status is Status.CANCELLED and r.lean_calls == 0 and r.generator_calls == 0

    event = threading.Event()
    seen: list[dict] = []

    def progress(payload: dict) -> None:
        seen.append(payload)
        if payload["expansions"] == 2:
            event.set()

    env = GraphEnv({}, successor=lambda pp, t: pp + "x")
    r = best_first_search(THEOREM, env, ScriptedGenerator(default=[("a", -1)]), budget(), cancel=event, progress=progress)
    assert r.status is Status.CANCELLED and r.expansions == 2 and len(seen) == 2


def test_progress_reports_every_expansion_and_its_errors_are_contained() -> None:
    seen: list[dict] = []
    env = GraphEnv(chain(3))
    gen = ScriptedGenerator({"root": [("t0", -0.1)], "s1": [("t1", -0.2)], "s2": [("t2", -0.3)]})
    best_first_search(THEOREM, env, gen, budget(), progress=seen.append)
    assert [p["expansions"] for p in seen] == [1, 2, 3]
    assert all({"expansions", "max_depth", "elapsed_s", "strategy"} <= p.keys() for p in seen)
    assert [p["max_depth"] for p in seen] == [1, 2, 3]

    def bad(payload):
        raise ValueError("callback bug")

    r = best_first_search(THEOREM, GraphEnv(chain(3)), gen, budget(), progress=bad)
    assert r.status is Status.PROVED and r.error_counts == {"progress_callback": 3}


def test_cache_hits_are_counted_from_the_from_cache_flag() -> None:
    env = CachingEnv(GraphEnv(chain(3)))
    gen = ScriptedGenerator({"root": [("t0", -0.1), ("x", -1)], "s1": [("t1", -0.2)], "s2": [("t2", -0.3)]})
    first = best_first_search(THEOREM, env, gen, budget())
    second = best_first_search(THEOREM, env, gen, budget())
    assert (first.cache_hits, first.cache_misses) == (0, 4)
    assert (second.cache_hits, second.cache_misses) == (4, 0)
    assert second.status is Status.PROVED and len(env.inner.calls) == 4


def test_start_failure_is_an_error_record() -> None:
    r = best_first_search(THEOREM, GraphEnv({}, start_error="unknown theorem thm"), ScriptedGenerator(), budget())
    assert r.status is Status.ERROR and "unknown theorem thm" in r.errors[0]
    assert r.error_counts == {"env_start": 1}


def test_invariants_on_a_random_graph() -> None:
    import random

    rng = random.Random(7)
    n = 60
    edges: dict[str, dict[str, object]] = {}
    for i in range(n):
        out = {}
        for j in range(rng.randint(0, 4)):
            out[f"t{j}"] = f"n{rng.randrange(n)}" if rng.random() > 0.03 else QED
        edges["root" if i == 0 else f"n{i}"] = out
    script = {s: [(t, -rng.random() * 3) for t in list(out) + ["junk"]] for s, out in edges.items()}
    for max_depth in (2, 4, 8):
        env = GraphEnv(edges)
        gen = ScriptedGenerator(script)
        e = engine(env, gen, budget(max_depth=max_depth, max_expansions=1000))
        r = e.run()
        assert r.max_depth_reached <= max_depth
        asked = gen.states_asked
        assert r.expansions == len(asked) == len(set(asked))  # each state expanded at most once
        assert {s for s, _, _ in env.calls} <= set(asked)
        if r.proved:
            assert len(r.proof) <= max_depth
        for node in e.table.values():
            tactics, _ = node.path()
            assert len(tactics) == node.depth
            if node.failed:
                assert node.expanded and node.live_children == 0
