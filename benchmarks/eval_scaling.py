"""Batch evaluation scaling: theorems/s with 1 and 2 Ray prover actors, and generator batching.

Prints ONE JSON object. What is measured:

1. `scaling`: the bundled LeanDojo sample (108 theorems; 47 replayable open in the replay
   environment, the others are refused and recorded as errors) through the replay
   environment with `--latency-ms` of sleep per tactic (standing in for Lean) and the
   oracle generator (cheap: no model), best-first with 8 expansions × 4 tactics. The same
   run with 1 and with 2 Ray prover actors (1 CPU each, local Ray on this machine).
   `theorems_per_s` = theorems / `serving_s`, the seconds from the first theorem handed to
   an actor to the last result (actor start-up excluded; it is reported separately as
   `startup_s`, the rest of the run's wall time). The ratio is 2-actor over 1-actor.
2. `batching`: 8 concurrent searches (8 prover threads of the in-process backend) share
   one generator through the `BatchingGenerator`, on the sample's theorems that open in
   the replay environment, with the sampling strategy (pass@16) and a weak oracle (the
   recorded tactic gets 5-25% of the probability) so searches call the generator many
   times, as real ones do. The generator stands in for a GPU model: each `propose` call
   costs `--call-ms` + `--per-state-ms` × states (serialised, as one GPU serves one call
   at a time). Reported: states and requests per generate call, and theorems/s with
   batching against the same run with batching off (`max_batch_states=1`: every
   search's call goes to the model alone).

Usage: python benchmarks/eval_scaling.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prover.eval.config import Distribution, EnvSpec, EvalConfig, GeneratorOptions, MemberSpec, resolve_benchmark  # noqa: E402
from prover.eval.local_backend import LocalBackend  # noqa: E402
from prover.eval.runner import run_eval  # noqa: E402
from search.budget import Budget  # noqa: E402


class GpuLikeGenerator:
    """The oracle's candidates at a GPU-like cost: `call_s + per_state_s * states` seconds per
    call, one call at a time (a lock: one model, one forward)."""

    def __init__(self, inner, call_s: float, per_state_s: float) -> None:
        self.inner = inner
        self.name = inner.name
        self.call_s = call_s
        self.per_state_s = per_state_s
        self.lock = threading.Lock()
        self.calls = 0
        self.states = 0

    def propose(self, states, k):
        with self.lock:
            time.sleep(self.call_s + self.per_state_s * len(states))
            self.calls += 1
            self.states += len(states)
            return self.inner.propose(states, k)


def _config(bench, latency_s: float, workers: int, use_ray: bool, limit: int | None, batch_max_states: int = 64) -> EvalConfig:
    return EvalConfig(
        benchmarks=(bench,),
        members=(MemberSpec("oracle", "oracle", "oracle"),),
        env=EnvSpec("replay", (bench.path,), latency_s),
        strategy="best_first",
        budget=Budget(max_expansions=8, tactics_per_expansion=4, time_limit_s=120, tactic_timeout_s=10),
        generator_options=GeneratorOptions(seed=0),
        distribution=Distribution(workers=workers, use_ray=use_ray, batch_max_states=batch_max_states),
        limit=limit,
    )


def scaling(bench, latency_s: float, limit: int | None) -> dict:
    import ray

    ray.init(num_cpus=2, object_store_memory=128 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    out: dict = {}
    try:
        for workers in (1, 2):
            with tempfile.TemporaryDirectory() as tmp:
                started = time.monotonic()
                outcome = run_eval(_config(bench, latency_s, workers, True, limit), Path(tmp) / "run")
                wall = time.monotonic() - started
            serving = outcome.report.serving_s
            out[f"actors_{workers}"] = {
                "theorems": outcome.new_theorems,
                "proved": outcome.summary["proved"],
                "serving_s": round(serving, 3),
                "startup_s": round(wall - serving, 3),
                "theorems_per_s": round(outcome.new_theorems / serving, 3),
            }
    finally:
        ray.shutdown()
    out["speedup_2_over_1"] = round(out["actors_2"]["theorems_per_s"] / out["actors_1"]["theorems_per_s"], 3)
    return out


def startable_benchmark(bench, directory: Path):
    """The theorems of `bench` that the replay environment can open (the replayable ones),
    as a LeanDojo file."""
    from prover.replay import ReplayEnvironment

    replayable = set(ReplayEnvironment.from_benchmark(bench.path).startable_ids)
    raw = json.loads(Path(bench.path).read_text())
    path = directory / "startable.json"
    path.write_text(json.dumps([t for t in raw if t["full_name"] in replayable]))
    return resolve_benchmark(str(path))


def batching(bench, latency_s: float, call_s: float, per_state_s: float, limit: int | None) -> dict:
    from prover.eval.config import build_replay
    from prover.generators.oracle import OracleGenerator

    out: dict = {}
    workdir = tempfile.TemporaryDirectory()
    startable = startable_benchmark(bench, Path(workdir.name))
    for label, max_states in (("batched", 64), ("unbatched", 1)):
        config = _config(startable, latency_s, 8, False, limit, batch_max_states=max_states)
        config = replace(config, strategy="sampling", budget=replace(config.budget, max_passes=16))
        # A weak "model": the recorded tactic gets 5-25% of the mass, so searches need many
        # passes (many generator calls) as real ones do.
        oracle = OracleGenerator(build_replay([startable.path]), seed=0, distractors=8, recorded_mass=(0.05, 0.25), name="oracle")
        model = GpuLikeGenerator(oracle, call_s, per_state_s)
        with tempfile.TemporaryDirectory() as tmp:
            outcome = run_eval(config, Path(tmp) / "run", backend=LocalBackend(config, generators={"oracle": model}))
        stats = outcome.report.batching["oracle"]
        out[label] = {
            "theorems": outcome.new_theorems,
            "serving_s": round(outcome.report.serving_s, 3),
            "theorems_per_s": round(outcome.new_theorems / outcome.report.serving_s, 3),
            "generate_calls": stats["calls"],
            "states_per_call": round(stats["states_per_call"], 3),
            "requests_per_call": round(stats["requests_per_call"], 3),
            "max_states_per_call": stats["max_states_per_call"],
        }
    out["theorems_note"] = f"the {len(startable.load())} replayable theorems of the sample"
    workdir.cleanup()
    out["speedup_batched_over_unbatched"] = round(out["batched"]["theorems_per_s"] / out["unbatched"]["theorems_per_s"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Fewer theorems and less latency (a smoke run).")
    parser.add_argument("--latency-ms", type=float, default=None, help="Sleep per tactic in the replay environment (default 40, quick 15).")
    parser.add_argument("--call-ms", type=float, default=60.0, help="Batching part: fixed cost of one generate call.")
    parser.add_argument("--per-state-ms", type=float, default=4.0, help="Batching part: extra cost per state in a call.")
    args = parser.parse_args()
    latency_ms = args.latency_ms if args.latency_ms is not None else (15.0 if args.quick else 40.0)
    limit = 40 if args.quick else None
    bench = resolve_benchmark("leandojo")
    result = {
        "benchmark": "eval_scaling",
        "machine": {"cpus": len(os.sched_getaffinity(0))},
        "setup": {
            "benchmark": bench.label,
            "theorems_limit": limit,
            "env": f"replay, {latency_ms:g} ms sleep per tactic",
            "generator": "oracle (no model)",
            "search": "best_first, 8 expansions x 4 tactics",
            "batching_search": "sampling pass@16, weak oracle, 8 prover threads",
            "batching_generator_cost_ms": f"{args.call_ms:g} + {args.per_state_ms:g} per state, serialised",
        },
        "scaling": scaling(bench, latency_ms / 1000.0, limit),
        "batching_8_searches": batching(bench, latency_ms / 1000.0, args.call_ms / 1000.0, args.per_state_ms / 1000.0, limit),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
