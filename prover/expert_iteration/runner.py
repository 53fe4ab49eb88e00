"""`run_expert_iteration`: the stages of every iteration, in a resumable run directory.

Iteration 0: `data` (the fixed evaluation split held out first, then the training file
without the held-out proofs, and the unproved set), `train` (one checkpoint per N_eff), `eval`. Iteration i >= 1: `search` (prove the
unproved set of iteration i-1 with the ensemble of iteration i-1, through `run_eval`),
`data` (replay every verified member proof in the environment and merge its steps into
the training file, with provenance, without duplicates), `train`, `eval`. After each
iteration: `iter-<i>/manifest.json` and the run's `summary.{json,md,png}`.

The evaluation stage defaults to the fixed evaluation split (`iter-0/data/eval.json`),
disjoint from every theorem whose proof is trained on; its manifest records the overlap
of the evaluated theorems with the training data (0 for the default split).

Files: `iter-<i>/data/{train.json, unproved.json, eval.json (iteration 0), pairs.jsonl (all pairs added so far),
new_pairs.jsonl (this iteration's)}`, `iter-<i>/train/{neff-N/, ensemble.json}`,
`iter-<i>/{search,eval}/run/` (evaluation run directories).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from prover.expert_iteration import dataset as ds
from prover.expert_iteration.config import ExpertConfig, SearchSettings
from prover.expert_iteration.stages import StageStore, atomic_write_json

CONFIG = "config.json"
TrainStepHook = Callable[[int, int, dict[str, Any]], None]  # (iteration, n_eff, step record)


class ExpertRunError(RuntimeError):
    """The run cannot go on (a different config in the run directory, an incomplete search)."""


@dataclass
class ExpertOutcome:
    run_dir: Path
    summary: dict[str, Any]


def run_expert_iteration(config: ExpertConfig, run_dir: str | Path, *, progress: bool = False,
                         on_train_step: TrainStepHook | None = None) -> ExpertOutcome:
    """Run (or resume) every iteration of `config` in `run_dir`; see the module docstring.

    `on_train_step(iteration, n_eff, record)` is called after each optimizer step."""
    root = Path(run_dir).resolve()
    _check_config(root, config)
    driver = _Driver(config, root, progress, on_train_step)
    for iteration in range(config.iterations + 1):
        driver.iteration(iteration)
    from prover.expert_iteration.summary import write_summary

    return ExpertOutcome(root, write_summary(root, config.iterations))


def _check_config(root: Path, config: ExpertConfig) -> None:
    path = root / CONFIG
    stored_config = {"identity": config.identity(), "config": json.loads(config.model_dump_json())}
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("identity") != config.identity():
            diffs = sorted(k for k in set(stored.get("identity", {})) | set(config.identity())
                           if stored.get("identity", {}).get(k) != config.identity().get(k))
            raise ExpertRunError(f"{root} holds an expert-iteration run with different settings ({', '.join(diffs)}); "
                                 "resume it with the same settings or choose another run directory")
    atomic_write_json(path, stored_config)


class _Driver:
    def __init__(self, config: ExpertConfig, root: Path, progress: bool, hook: TrainStepHook | None) -> None:
        from training.data import SAMPLE_PATH

        self.config = config
        self.root = root
        self.store = StageStore(root)
        self.progress = progress
        self.hook = hook
        self.data_path = Path(config.data or SAMPLE_PATH).resolve()
        sources = config.env_sources or [self.data_path, *([config.unproved] if config.unproved else [])]
        self.env_sources = tuple(str(Path(p).resolve()) for p in sources)

    # --------------------------------------------------------------- paths

    def data_file(self, iteration: int, name: str) -> Path:
        return self.store.stage_dir(iteration, "data") / name

    def ensemble_manifest(self, iteration: int) -> Path:
        from training.ensemble import MANIFEST_NAME

        return self.store.stage_dir(iteration, "train") / MANIFEST_NAME

    # ------------------------------------------------------------- iteration

    def iteration(self, i: int) -> None:
        stages: dict[str, dict[str, Any]] = {}
        if i > 0:
            stages["search"] = self.store.run(i, "search", {
                "unproved": str(self.data_file(i - 1, "unproved.json")),
                "ensemble": self.config.search_generator or str(self.ensemble_manifest(i - 1)),
                "search": self.config.search.model_dump()}, lambda d: self._search(i, d))
            stages["data"] = self.store.run(i, "data", {
                "previous_train": str(self.data_file(i - 1, "train.json")),
                "search_results": stages["search"]["outputs"]["run_dir"]}, lambda d: self._merge(i, d))
        else:
            stages["data"] = self.store.run(0, "data", {
                "data": str(self.data_path), "unproved": str(self.config.unproved) if self.config.unproved else None,
                "holdout_fraction": self.config.holdout_fraction, "holdout_seed": self.config.holdout_seed,
                "eval_fraction": self.config.eval_fraction},
                lambda d: self._initial_data(d))
        stages["train"] = self.store.run(i, "train", {
            "data": str(self.data_file(i, "train.json")), "n_effs": self.config.n_effs,
            "retrain_from": self.config.retrain_from}, lambda d: self._train(i, d))
        stages["eval"] = self.store.run(i, "eval", {
            "ensemble": str(self.ensemble_manifest(i)), "eval": self.config.eval.model_dump(),
            "benchmark": self._eval_source()}, lambda d: self._eval(i, d))
        atomic_write_json(self.root / f"iter-{i}" / "manifest.json", {
            "iteration": i, "status": "completed",
            "stages": {name: {"status": m["status"], "manifest": str(self.store.manifest_path(i, name)),
                              "counts": m.get("counts", {})} for name, m in stages.items()}})
        from prover.expert_iteration.summary import write_summary

        write_summary(self.root, i)

    # ----------------------------------------------------------------- stages

    def _initial_data(self, stage_dir: Path) -> tuple[dict, dict]:
        theorems = ds.read_raw(self.data_path)
        train, unproved, evaluation = ds.initial_split(
            theorems, eval_fraction=self.config.eval_fraction, holdout_fraction=self.config.holdout_fraction,
            seed=self.config.holdout_seed, unproved=ds.read_raw(self.config.unproved) if self.config.unproved else None)
        ds.write_leandojo(stage_dir / "train.json", train)
        ds.write_leandojo(stage_dir / "unproved.json", unproved)
        ds.write_leandojo(stage_dir / "eval.json", evaluation)
        ds.write_pairs(stage_dir / "pairs.jsonl", [])
        ds.write_pairs(stage_dir / "new_pairs.jsonl", [])
        return (
            {"train": str(stage_dir / "train.json"), "unproved": str(stage_dir / "unproved.json"),
             "eval": str(stage_dir / "eval.json"), "pairs": str(stage_dir / "pairs.jsonl")},
            {"train_theorems": len(train), "train_pairs": len(ds.existing_keys(train)), "unproved": len(unproved),
             "unproved_ids": [t["full_name"] for t in unproved], "eval_theorems": len(evaluation),
             "eval_ids": [t["full_name"] for t in evaluation]},
        )

    def _search(self, i: int, stage_dir: Path) -> tuple[dict, dict]:
        from prover.eval.config import parse_members, resolve_benchmark

        unproved = self.data_file(i - 1, "unproved.json")
        run_dir = stage_dir / "run"
        if not ds.read_raw(unproved):
            return {"run_dir": None}, {"searched": 0, "proved": 0, "proved_per_member": {}}
        generator = self.config.search_generator
        members = parse_members(None, None if generator else str(self.ensemble_manifest(i - 1)), generator, self.config.backend)
        summary = self._evaluate(resolve_benchmark(str(unproved)), members, self.config.search, run_dir, "search")
        rows = next(iter(summary["benchmarks"].values()))["rows"]
        from prover.eval.records import ENSEMBLE

        return ({"run_dir": str(run_dir)},
                {"searched": rows[ENSEMBLE]["theorems"], "proved": rows[ENSEMBLE]["proved"],
                 "proved_per_member": {m: r["proved"] for m, r in rows.items() if m != ENSEMBLE}})

    def _merge(self, i: int, stage_dir: Path) -> tuple[dict, dict]:
        from prover.eval.config import EnvSpec
        from prover.eval.records import ENSEMBLE
        from prover.eval.rundir import RunDirectory
        from prover.theorems import load_leandojo

        previous_train = ds.read_raw(self.data_file(i - 1, "train.json"))
        unproved_path = self.data_file(i - 1, "unproved.json")
        unproved = ds.read_raw(unproved_path)
        search_dir = self.store.completed(i, "search")["outputs"]["run_dir"]
        records = RunDirectory(Path(search_dir)).records() if search_dir else []
        theorems = {t.id: t for t in load_leandojo(unproved_path)}
        pairs: list[ds.Pair] = []
        proved: set[str] = set()
        replay_failures: list[str] = []
        unverified = 0
        proofs = [r for r in records if r.member != ENSEMBLE and r.proved]
        if proofs:
            with EnvSpec(self.config.env, self.env_sources).build() as env:
                for record in proofs:
                    result = record.search_result()
                    if not (result.verified and result.proof):
                        unverified += 1  # cannot happen for status "proved" (SearchResult invariant); counted anyway
                        continue
                    try:
                        steps = ds.replay_proof(env, theorems[record.theorem_id], result.proof, iteration=i,
                                                member=record.member, tactic_timeout_s=self.config.search.tactic_timeout_s)
                    except ds.ReplayError as err:
                        replay_failures.append(str(err))
                        continue
                    pairs.extend(steps)
                    proved.add(record.theorem_id)
        merged, report = ds.merge_pairs(previous_train, {t["full_name"]: t for t in unproved}, pairs, i)
        remaining = [t for t in unproved if t["full_name"] not in proved]
        ds.write_leandojo(stage_dir / "train.json", merged)
        ds.write_leandojo(stage_dir / "unproved.json", remaining)
        ds.write_pairs(stage_dir / "new_pairs.jsonl", report.added)
        earlier = ds.read_pairs(self.data_file(i - 1, "pairs.jsonl"))
        ds.write_pairs(stage_dir / "pairs.jsonl", [*earlier, *report.added])
        return (
            {"train": str(stage_dir / "train.json"), "unproved": str(stage_dir / "unproved.json"),
             "new_pairs": str(stage_dir / "new_pairs.jsonl"), "pairs": str(stage_dir / "pairs.jsonl")},
            {**report.counts(), "proofs_replayed": len(proofs) - unverified - len(replay_failures),
             "pairs_replayed": len(pairs), "replay_failures": len(replay_failures),
             "replay_failure_messages": replay_failures[:20], "unverified_skipped": unverified,
             "proved": len(proved), "proved_ids": sorted(proved), "unproved_before": len(unproved),
             "unproved_after": len(remaining), "train_theorems": len(merged),
             "train_pairs": len(ds.existing_keys(merged))},
        )

    def _train(self, i: int, stage_dir: Path) -> tuple[dict, dict]:
        from training.config import load_config
        from training.ensemble import member_name, read_manifest
        from training.ensemble_training import train_ensemble

        base = load_config(self.config.train_config, **self.config.train_overrides)
        previous = {}
        if i > 0 and self.config.retrain_from == "previous":
            previous = {m.n_eff: m.checkpoint for m in read_manifest(self.ensemble_manifest(i - 1)).members}
        runs = []
        for n_eff in self.config.n_effs:
            run = base.with_overrides(n_eff=n_eff, data=self.data_file(i, "train.json"), progress=self.progress,
                                      output_dir=stage_dir / member_name(n_eff), model=previous.get(n_eff))
            if n_eff in previous and base.tokenizer is None:
                run = run.with_overrides(tokenizer=base.model)
            runs.append(run)
        hook = None if self.hook is None else (lambda run, record: self.hook(i, run.n_eff, record))
        members = train_ensemble(runs, self.ensemble_manifest(i), on_step=hook)
        return ({"ensemble": str(self.ensemble_manifest(i)), "checkpoints": {m.name: m.checkpoint for m in members}},
                {"members": len(members), "steps": {m.name: m.steps for m in members}})

    def _eval_source(self) -> str:
        """The evaluation benchmark: the given one, else the fixed held-out split."""
        return self.config.eval_benchmark or str(self.data_file(0, "eval.json"))

    def _trained_ids(self, i: int) -> set[str]:
        """Every theorem whose proof iteration `i`'s models were trained on."""
        return {t["full_name"] for t in ds.read_raw(self.data_file(i, "train.json")) if t["traced_tactics"]}

    def _eval(self, i: int, stage_dir: Path) -> tuple[dict, dict]:
        from prover.eval.config import parse_members, resolve_benchmark

        benchmark = resolve_benchmark(self._eval_source())
        if benchmark.format == "leandojo" and not ds.read_raw(benchmark.path):
            return {"run_dir": None, "benchmark": benchmark.name}, {"rows": {}, "overlap_with_training": 0}
        members = parse_members(None, str(self.ensemble_manifest(i)), None, self.config.backend)
        summary = self._evaluate(benchmark, members, self.config.eval, stage_dir / "run", "eval")
        info = next(iter(summary["benchmarks"].values()))
        rows = {m: {"proved": r["proved"], "theorems": r["theorems"], "pass_rate": r["pass_rate"], "errors": r.get("errors", 0)}
                for m, r in info["rows"].items()}
        evaluated = {t.id for t in benchmark.load()}
        overlap = len(evaluated & self._trained_ids(i)) if benchmark.format == "leandojo" else 0
        return ({"run_dir": str(stage_dir / "run"), "benchmark": benchmark.name},
                {"rows": rows, "benchmark": benchmark.label or benchmark.name, "overlap_with_training": overlap})

    # ---------------------------------------------------------------- helpers

    def _evaluate(self, benchmark, members, settings: SearchSettings, run_dir: Path, what: str) -> Mapping[str, Any]:
        from prover.eval.config import Distribution, EnvSpec, EvalConfig, GeneratorOptions
        from prover.eval import runner as eval_runner
        from search.budget import Budget

        sources = self.env_sources
        if benchmark.format == "leandojo" and benchmark.path not in sources:
            sources = (*sources, benchmark.path)
        config = EvalConfig(
            benchmarks=(benchmark,), members=tuple(members), env=EnvSpec(self.config.env, sources if self.config.env == "replay" else ()),
            strategy=settings.strategy,
            budget=Budget(max_depth=settings.max_depth, time_limit_s=settings.time_limit_s, max_expansions=settings.max_expansions,
                          tactics_per_expansion=settings.tactics_per_expansion, max_passes=settings.max_passes,
                          tactic_timeout_s=settings.tactic_timeout_s),
            ensemble="independent",
            generator_options=GeneratorOptions(temperature=settings.temperature, max_new_tokens=settings.max_new_tokens, seed=settings.seed),
            distribution=Distribution(workers=self.config.workers, use_ray=self.config.ray_address is not None,
                                      ray_address=self.config.ray_address),
            limit=settings.limit,
        )
        outcome = eval_runner.run_eval(config, run_dir, resume=(run_dir / "config.json").exists(), progress=self.progress)
        if not outcome.summary["complete"]:
            raise ExpertRunError(f"the {what} run {run_dir} stopped short of recording every theorem; run again to resume it")
        return outcome.summary
