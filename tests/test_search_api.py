"""The `search.api.search` entry point and the result record."""

from __future__ import annotations

import json
import threading

import pytest
from search_doubles import QED, THEOREM, GraphEnv, ScriptedGenerator, chain

from search.api import search
from search.budget import Budget
from search.result import SearchResult, Status

SCRIPT = {"root": [("t0", -0.1)], "s1": [("t1", -0.2)], "s2": [("t2", -0.3)]}


@pytest.mark.parametrize("strategy", ["best_first", "sampling"])
def test_single_generator_both_strategies(strategy: str) -> None:
    r = search(THEOREM, GraphEnv(chain(3)), ScriptedGenerator(SCRIPT, name="m1"), strategy=strategy, budget=Budget())
    assert r.status is Status.PROVED and r.proof == ["t0", "t1", "t2"]
    assert r.strategy == strategy and r.member == "m1" and r.members == {}


@pytest.mark.parametrize("ensemble", ["union", "mixture"])
def test_mapping_of_generators(ensemble: str) -> None:
    gens = {"n1": ScriptedGenerator({"root": [("zz", -0.1)]}, name="x"), "n4": ScriptedGenerator(SCRIPT, name="y")}
    r = search(THEOREM, GraphEnv(chain(3)), gens, strategy="best_first", budget=Budget(), ensemble=ensemble)
    assert r.status is Status.PROVED and r.member == "n4"  # mapping keys name the members
    assert (set(r.members) == {"n1", "n4"}) is (ensemble == "union")


def test_start_error_gives_an_error_record_for_every_mode() -> None:
    env = GraphEnv({}, start_error="Lean failed to start")
    for generators in (ScriptedGenerator(), {"a": ScriptedGenerator()}):
        for ensemble in ("union", "mixture"):
            for strategy in ("best_first", "sampling"):
                r = search(THEOREM, env, generators, strategy=strategy, budget=Budget(), ensemble=ensemble)
                assert r.status is Status.ERROR and "Lean failed to start" in r.errors[0]


def test_start_raising_anything_is_an_error_record() -> None:
    class Exploding(GraphEnv):
        def start(self, theorem):
            raise RuntimeError("boom")

    r = search(THEOREM, Exploding({}), ScriptedGenerator(), strategy="best_first", budget=Budget())
    assert r.status is Status.ERROR and "boom" in r.errors[0]


def test_cancelled_search_returns_cancelled() -> None:
    event = threading.Event()
    event.set()
    for gens in (ScriptedGenerator(SCRIPT), {"a": ScriptedGenerator(SCRIPT)}):
        r = search(THEOREM, GraphEnv(chain(3)), gens, strategy="sampling", budget=Budget(), cancel=event)
        assert r.status is Status.CANCELLED and r.lean_calls == 0


def test_progress_in_a_union_names_the_member() -> None:
    seen: list[dict] = []
    gens = {"a": ScriptedGenerator(SCRIPT), "b": ScriptedGenerator(SCRIPT)}
    search(THEOREM, GraphEnv(chain(3)), gens, strategy="best_first", budget=Budget(), progress=seen.append)
    assert seen and all(p["member"] in ("a", "b") and "elapsed_s" in p and "expansions" in p for p in seen)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(strategy="dfs"), ValueError, "unknown strategy"),
        (dict(strategy="best_first", ensemble="vote"), ValueError, "unknown ensemble"),
        (dict(strategy="best_first", budget={"max_depth": 3}), TypeError, "Budget"),
        (dict(strategy="best_first", length_alpha=-1.0), ValueError, "length_alpha"),
        (dict(strategy="best_first", length_alpha=float("nan")), ValueError, "length_alpha"),
        (dict(strategy="sampling", samples_per_step=0), ValueError, "samples_per_step"),
        (dict(strategy="sampling", parallel_passes=1.5), ValueError, "parallel_passes"),
        (dict(strategy="best_first", tactic_filter=("sorry",)), TypeError, "TacticFilter"),
    ],
)
def test_bad_arguments_raise_with_a_clear_message(kwargs, error, match) -> None:
    kwargs.setdefault("budget", Budget())
    env = GraphEnv(chain(3))
    with pytest.raises(error, match=match):
        search(THEOREM, env, ScriptedGenerator(SCRIPT), **kwargs)
    assert env.calls == []


def test_bad_generator_raises() -> None:
    with pytest.raises(TypeError, match="TacticGenerator"):
        search(THEOREM, GraphEnv({}), object(), strategy="best_first", budget=Budget())  # type: ignore[arg-type]


def test_result_record_round_trips_through_json() -> None:
    gens = {"a": ScriptedGenerator({"root": [("sorry", -0.1), ("x", -1)]}), "b": ScriptedGenerator(SCRIPT)}
    r = search(THEOREM, GraphEnv(chain(3)), gens, strategy="best_first", budget=Budget())
    record = json.loads(json.dumps(r.to_json()))
    assert record["status"] == "proved" and record["members"]["a"]["dropped_candidates"] == {"forbidden": 1}
    back = SearchResult.from_json(record)
    assert back == r
    # Records written before the additive fields existed still load.
    old = {k: v for k, v in record.items() if k not in ("error_counts", "dropped_candidates", "proof_members")}
    old["members"] = {}
    assert SearchResult.from_json(old).error_counts == {}


def test_proof_at_exactly_the_depth_cap() -> None:
    env = GraphEnv({"root": {"a": "A"}, "A": {"q": QED}})
    gen = ScriptedGenerator({"root": [("a", -1)], "A": [("q", -1)]})
    assert search(THEOREM, env, gen, strategy="best_first", budget=Budget(max_depth=2)).proved
    assert not search(THEOREM, env, gen, strategy="best_first", budget=Budget(max_depth=1)).proved


def test_search_is_a_leaf_package() -> None:
    import ast
    from pathlib import Path

    import search

    for path in Path(search.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = []
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            for module in modules:
                assert module.split(".")[0] not in ("training", "prover", "service"), f"{path.name} imports {module}"
