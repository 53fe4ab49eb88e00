"""Table 2 and Table 4 from ONE evaluation run, and their reproducibility (issue 13).

Prints ONE JSON object. What is measured, model-free (no GPU, no Lean):

- Two benchmark columns in one run: the bundled LeanDojo sample's theorems that open in
  the replay environment, split in two halves by theorem ("split A", "split B").
- Three ensemble members that are the same oracle "model" (`OracleGenerator`, a replay-
  data model with real sampling semantics), each sampling from its own seeded stream:
  an ensemble of identical members, so the equal-compute baseline (member A alone with 3×
  the passes and wall clock) should match the ensemble within sampling noise — a check
  that the compute accounting is fair.
- pass@N sampling, `--passes` per member (the baseline gets 3×), one tactic sampled per
  step, at most 50 steps.
- The same configuration with 1 and 2 prover threads: `identical_across_workers` says
  whether every record (wall-clock times aside) is the same.

Reported: per column and row the pass rate and errors; per row the compute (passes,
generator calls, Lean calls, wall time); Table 4's pass@n per row; the run's wall time.

Usage: python benchmarks/eval_tables.py [--passes 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prover.eval.config import Distribution, EnvSpec, EvalConfig, MemberSpec, resolve_benchmark  # noqa: E402
from prover.eval.rundir import RunDirectory  # noqa: E402
from prover.eval.runner import run_eval  # noqa: E402
from prover.replay import ReplayEnvironment  # noqa: E402
from search.budget import Budget  # noqa: E402
from training.data import SAMPLE_PATH, split_theorem_ids, write_benchmark_subset  # noqa: E402

TIMING = ("generator_time_s", "lean_time_s", "wall_time_s")


def _records(run_dir: Path) -> dict:
    out = {}
    for r in RunDirectory(run_dir).records():
        out[(r.benchmark, r.theorem_id, r.member)] = json.dumps({k: v for k, v in r.result.items() if k not in TIMING}, sort_keys=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--passes", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ids = ReplayEnvironment.from_benchmark(SAMPLE_PATH).startable_ids
        a, b = split_theorem_ids(ids, 0.5, 0)
        write_benchmark_subset(SAMPLE_PATH, a, root / "split_A.json")
        write_benchmark_subset(SAMPLE_PATH, b, root / "split_B.json")
        benches = (resolve_benchmark(str(root / "split_A.json")), resolve_benchmark(str(root / "split_B.json")))
        members = tuple(MemberSpec(f"oracle-{x}", "oracle", "oracle") for x in "abc")

        def config(workers: int) -> EvalConfig:
            return EvalConfig(
                benchmarks=benches,
                members=members,
                env=EnvSpec("replay", tuple(b.path for b in benches)),
                strategy="sampling",
                budget=Budget(max_passes=args.passes, max_depth=50, time_limit_s=600.0),
                baseline="oracle-a",
                distribution=Distribution(workers=workers, use_ray=False),
            )

        started = time.monotonic()
        one = run_eval(config(1), root / "one")
        wall_one = time.monotonic() - started
        run_eval(config(2), root / "two")
        identical = _records(root / "one") == _records(root / "two")
        summary = one.summary
        table2, table4 = {}, {}
        for bench, info in summary["benchmarks"].items():
            for name, row in info["rows"].items():
                entry = table2.setdefault(name, {"compute": {}})
                entry[info["label"]] = {"pass_rate": round(row["pass_rate"], 4), "proved": row["proved"],
                                        "theorems": row["theorems"], "errors": row["errors"]}
                for key in ("passes", "generator_calls", "lean_calls", "wall_time_s"):
                    entry["compute"][key] = round(entry["compute"].get(key, 0) + row["compute"][key], 3)
                table4.setdefault(info["label"], {})[name] = {n: round(v, 4) for n, v in row.get("pass_at", {}).items()
                                                              if int(n) in (1, 4, 16, 64, 256, 1024, 4096) or int(n) == row["pass_at_limit"]}
        print(json.dumps({
            "benchmarks": {info["label"]: info["recorded"] for info in summary["benchmarks"].values()},
            "passes_per_member": args.passes,
            "table2": table2,
            "table4_pass_at": table4,
            "identical_across_workers": identical,
            "run_wall_s_one_worker": round(wall_one, 2),
        }, indent=1))


if __name__ == "__main__":
    main()
