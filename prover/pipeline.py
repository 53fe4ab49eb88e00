"""The end-to-end job: train CE and DCO models → search held-out theorems → Table-2 report.

Stages, each in its own part of the output directory and each resumable (re-running the
same command skips what is finished: the trainer resumes its own runs, the evaluation
resumes from its results file):

1. `split`  — the benchmark's theorems with traced tactics split by theorem into train and
   held-out (`split.json`, `benchmarks/{train,heldout}.json` in the benchmark's format).
2. `train`  — one checkpoint per N_eff on the train theorems only (`models/`, with the
   ensemble manifest `models/ensemble.json`).
3. `diagnose` — greedy-completion confidence of each checkpoint on the train and held-out
   tactics (`diagnostics/{train,heldout}/confidence.{json,png}`): the paper's Figure 1.
4. `eval`   — every member, the ensemble and the equal-compute baseline (the N_eff = 1
   member with M× the budget, M the number of members) searched on both theorem sets
   through the replay environment, in one run (`eval/`: results.jsonl, summary.json,
   table.md with Table 2 and, for sampling, Table 4's pass@n; plots).
5. `report` — `report.md` and `report.json` bringing the four together.

The embedded default uses the bundled LeanDojo sample, `tiny-qwen2` and the `tiny`
training config: no Lean, GPU or network.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from search.budget import Budget

Log = Callable[[str], None]


@dataclass(frozen=True)
class PipelineSettings:
    """What the pipeline runs. Times are wall-clock seconds.

    `heldout_fraction` of the theorems (by theorem, seeded by `seed`) is never trained on.
    `strategy` is `sampling` (the paper's pass@N; `budget.max_passes` per member) or
    `best_first`. `train_overrides` are `TrainConfig` fields applied on top of
    `train_config` (a bundled name such as `tiny`, or a YAML path).
    """

    output_dir: Path = Path("runs/pipeline")
    data: Path | None = None  # LeanDojo Benchmark 4 JSON; None = the bundled sample
    train_config: str = "tiny"
    train_overrides: dict[str, Any] = field(default_factory=dict)
    n_effs: tuple[int, ...] = (1, 4, 16)
    heldout_fraction: float = 0.2
    seed: int = 0
    strategy: str = "sampling"
    budget: Budget = field(default_factory=lambda: Budget(max_passes=32, max_expansions=32, time_limit_s=120.0))
    parallel_passes: int = 8
    temperature: float = 1.0
    baseline: bool = True  # the equal-compute row: the CE member with M× the budget
    workers: int = 1
    progress: bool = True

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["output_dir"] = str(self.output_dir)
        record["data"] = str(self.data) if self.data else None
        return record


@dataclass
class PipelineResult:
    report_md: Path
    report_json: Path
    summary: dict[str, Any]


def split_benchmark(settings: PipelineSettings, log: Log) -> tuple[Path, Path]:
    """Stage 1: train/held-out theorem files. Deterministic, so a rerun writes the same."""
    from training.data import SAMPLE_PATH, read_benchmark, split_theorem_ids, write_benchmark_subset

    source = settings.data or SAMPLE_PATH
    with_tactics = [t.full_name for t in read_benchmark(source) if t.traced_tactics]
    if len(with_tactics) < 2:
        raise ValueError(f"{source}: need at least two theorems with traced tactics, found {len(with_tactics)}")
    train_ids, heldout_ids = split_theorem_ids(with_tactics, settings.heldout_fraction, settings.seed)
    bench_dir = settings.output_dir / "benchmarks"
    train_path, heldout_path = bench_dir / "train.json", bench_dir / "heldout.json"
    write_benchmark_subset(source, train_ids, train_path)
    write_benchmark_subset(source, heldout_ids, heldout_path)
    (settings.output_dir / "split.json").write_text(
        json.dumps({"source": str(source), "seed": settings.seed, "train": train_ids, "heldout": heldout_ids}, indent=2)
    )
    log(f"split: {len(train_ids)} train and {len(heldout_ids)} held-out theorems (of {len(with_tactics)} with tactics)")
    return train_path, heldout_path


def train_members(settings: PipelineSettings, train_path: Path, log: Log) -> Path:
    """Stage 2: one checkpoint per N_eff on the train theorems; returns the manifest path."""
    from training.config import load_config
    from training.ensemble import MANIFEST_NAME
    from training.ensemble_training import member_configs, train_ensemble

    overrides = {"progress": settings.progress, **settings.train_overrides}
    base = load_config(settings.train_config, data=train_path, eval_fraction=0.0, seed=settings.seed, **overrides)
    models_dir = settings.output_dir / "models"
    manifest = models_dir / MANIFEST_NAME
    runs = member_configs(base, settings.n_effs, models_dir)
    train_ensemble(runs, manifest, on_start=lambda run: log(f"train: N_eff={run.n_eff} ({run.model}) -> {run.output_dir}"))
    return manifest


def diagnose_members(settings: PipelineSettings, manifest: Path, splits: dict[str, Path], log: Log) -> dict[str, Any]:
    """Stage 3: greedy confidence per checkpoint on each theorem set; mean p per member."""
    from training.diagnostics import diagnose
    from training.ensemble import read_manifest

    checkpoints = {m.name: m.checkpoint for m in read_manifest(manifest).members}
    means: dict[str, Any] = {}
    for split_name, path in splits.items():
        report = diagnose(checkpoints, settings.output_dir / "diagnostics" / split_name, data=path, split="all")
        means[split_name] = {name: s.get("mean_p") for name, s in report.summaries.items()}
        log(f"diagnose ({split_name}): mean greedy confidence " + ", ".join(f"{n} {p:.3f}" for n, p in means[split_name].items()))
    return means


def evaluate_members(settings: PipelineSettings, manifest: Path, splits: dict[str, Path], log: Log) -> dict[str, Any]:
    """Stage 4: every member and the ensemble on each theorem set, through replay."""
    from prover.eval.config import Distribution, EnvSpec, EvalConfig, GeneratorOptions, parse_members, resolve_benchmark
    from prover.eval.runner import run_eval

    members = tuple(parse_members(None, str(manifest), None))
    ce = [m.name for m in members if m.n_eff == 1]
    config = EvalConfig(
        benchmarks=tuple(resolve_benchmark(str(path)) for path in splits.values()),
        members=members,
        baseline=ce[0] if settings.baseline and ce and len(members) > 1 else None,
        env=EnvSpec("replay", tuple(str(path) for path in splits.values())),
        strategy=settings.strategy,
        budget=settings.budget,
        ensemble="independent",
        parallel_passes=settings.parallel_passes if settings.strategy == "sampling" else 1,
        generator_options=GeneratorOptions(temperature=settings.temperature, seed=settings.seed),
        distribution=Distribution(workers=settings.workers),
    )
    run_dir = settings.output_dir / "eval"
    outcome = run_eval(config, run_dir, resume=(run_dir / "config.json").exists(), progress=settings.progress)
    log(f"eval: {outcome.final_line()}")
    return outcome.summary


def write_report(settings: PipelineSettings, manifest: Path, confidence: dict[str, Any], summary: dict[str, Any]) -> PipelineResult:
    """Stage 5: one Markdown page and one JSON object for the whole run."""
    from training.ensemble import read_manifest

    members = read_manifest(manifest).members
    # The evaluation's own page, its headings demoted under this report's.
    table = "\n".join(
        "##" + line if line.startswith("#") else line
        for line in (settings.output_dir / "eval" / "table.md").read_text().splitlines()
    )
    lines = [
        "# dco-prover pipeline report",
        "",
        f"Data: `{settings.data or 'bundled LeanDojo Benchmark 4 sample'}`; training config `{settings.train_config}`; "
        f"held-out fraction {settings.heldout_fraction} (by theorem, seed {settings.seed}).",
        "",
        "## Training",
        "",
        "| member | N_eff | steps | final loss | mean F | discarded | mean greedy p (train) | mean greedy p (held-out) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    for m in members:
        lines.append(
            f"| {m.name} | {m.n_eff} | {m.steps} | {fmt(m.metrics.get('loss'))} | {fmt(m.metrics.get('mean_F'))} | "
            f"{m.metrics.get('discarded_total', 0)} | {fmt(confidence.get('train', {}).get(m.name))} | "
            f"{fmt(confidence.get('heldout', {}).get(m.name))} |"
        )
    plots = sorted((settings.output_dir / "eval" / "plots").glob("*.png"))
    lines += ["", "## Search (Table 2 shape)", "", table.strip(), ""]
    if plots:
        lines += ["Plots: " + ", ".join(f"`{p.relative_to(settings.output_dir)}`" for p in plots), ""]
    report_md = settings.output_dir / "report.md"
    report_md.write_text("\n".join(lines) + "\n")
    record = {
        "settings": settings.to_json(),
        "members": [m.model_dump(mode="json") for m in members],
        "confidence_mean_p": confidence,
        "eval_summary": summary,
    }
    report_json = settings.output_dir / "report.json"
    report_json.write_text(json.dumps(record, indent=2, default=str))
    return PipelineResult(report_md, report_json, record)


def run_pipeline(settings: PipelineSettings, log: Log = print) -> PipelineResult:
    """All stages in order (see the module docstring)."""
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    train_path, heldout_path = split_benchmark(settings, log)
    splits = {"heldout": heldout_path, "train": train_path}
    manifest = train_members(settings, train_path, log)
    confidence = diagnose_members(settings, manifest, splits, log)
    summary = evaluate_members(settings, manifest, splits, log)
    return write_report(settings, manifest, confidence, summary)
