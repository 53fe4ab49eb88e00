"""`dco-prover eval`: batch evaluation into a resumable run directory (Table 2 of the paper).

Exit status: 0 when every selected theorem is recorded and none ended in an error; 1 when
the run stopped short or some theorem ended in an error (an infrastructure error: resume
to retry it); 2 for bad input (unknown benchmark, bad flags, a run directory that does not
match, a smaller --limit on resume) and when nothing could start (e.g. miniF2F without
Lean), with the reason. Heavy imports happen inside the command so `--help` stays fast.
"""

from __future__ import annotations

import enum
import importlib.util
import logging
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from prover.cli.common import EXIT_NOT_DONE, EXIT_OK, EnvChoice, StrategyChoice, fail, split_list



class EnsembleModeChoice(str, enum.Enum):
    independent = "independent"
    shared = "shared"
    union = "union"
    mixture = "mixture"


class GeneratorChoice(str, enum.Enum):
    oracle = "oracle"
    fixed = "fixed"
    openai = "openai"


class BackendChoice(str, enum.Enum):
    transformers = "transformers"
    vllm = "vllm"


def eval_command(
    benchmark: Annotated[Optional[list[str]], typer.Option(help="'minif2f', 'leandojo' (the bundled sample) or a file (.jsonl miniF2F, .json LeanDojo), optionally SOURCE@SPLIT (minif2f@test); repeat for several columns.")] = None,
    split: Annotated[Optional[str], typer.Option(help="miniF2F split to keep (valid, test) for miniF2F benchmarks without @SPLIT; default: all.")] = None,
    ensemble: Annotated[Optional[Path], typer.Option(help="The trainer's ensemble manifest (one checkpoint per N_eff).")] = None,
    models: Annotated[Optional[list[str]], typer.Option(help="Checkpoints, 'tiny-qwen2', or NAME=PATH (repeat or comma-separate).")] = None,
    generator: Annotated[Optional[GeneratorChoice], typer.Option(help="A model-free generator instead of models: oracle (replay data) or fixed; or openai: model servers (--generator-url / --endpoints).")] = None,
    generator_url: Annotated[Optional[str], typer.Option(help="openai: one member served by a completions server (vllm serve) at http://HOST:PORT.")] = None,
    endpoints: Annotated[Optional[Path], typer.Option(help="openai: the endpoints manifest of `dco-prover serve-models` (one server per member).")] = None,
    served_model: Annotated[Optional[str], typer.Option(help="openai with --generator-url: the served model name (default: the only one listed).")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help="openai: the served checkpoint's directory (or hub id): its tokenizer and prompt budget build the prompt tokens (default with --endpoints: each member's 'checkpoint').")] = None,
    backend: Annotated[BackendChoice, typer.Option(help="Model backend: transformers, or vllm (falls back to transformers with a warning when vLLM/CUDA is missing).")] = BackendChoice.transformers,
    env: Annotated[Optional[EnvChoice], typer.Option(help="Every benchmark's environment. Default: replay for LeanDojo benchmarks, repl for miniF2F (each its own).")] = None,
    tactic_latency: Annotated[float, typer.Option(help="replay: seconds slept per tactic, to stand in for Lean (benchmarks).")] = 0.0,
    strategy: Annotated[StrategyChoice, typer.Option(help="best_first or sampling (pass@N).")] = StrategyChoice.best_first,
    ensemble_mode: Annotated[EnsembleModeChoice, typer.Option(help="independent: each member searched alone with its full budget (Table 2); shared: the members split one budget (equal compute); union / mixture: one combined search.")] = EnsembleModeChoice.independent,
    baseline: Annotated[Optional[str], typer.Option(help="Equal-compute baseline: this member searched again with M× the budget (M = members). Default: the N_eff=1 (CE) member of an ensemble manifest; 'none' to skip.")] = None,
    baseline_factor: Annotated[Optional[int], typer.Option(help="The baseline's budget multiple (default: the number of members).")] = None,
    retry_errors: Annotated[bool, typer.Option("--retry-errors/--no-retry-errors", help="On --resume, search again the theorems recorded as errors (default) or keep them.")] = True,
    max_depth: Annotated[int, typer.Option(help="Proof steps on a path at most.")] = 50,
    time_limit: Annotated[float, typer.Option(help="Wall-clock seconds per theorem per member.")] = 600.0,
    max_expansions: Annotated[int, typer.Option(help="best_first: node expansions at most.")] = 100,
    tactics_per_expansion: Annotated[int, typer.Option(help="best_first: candidates per expansion.")] = 8,
    max_passes: Annotated[int, typer.Option(help="sampling: passes per member (pass@N).")] = 64,
    tactic_timeout: Annotated[float, typer.Option(help="Wall-clock seconds per tactic.")] = 10.0,
    length_alpha: Annotated[float, typer.Option(help="best_first: length normalisation exponent (0 = off).")] = 0.0,
    samples_per_step: Annotated[int, typer.Option(help="sampling: tactics asked per step.")] = 1,
    parallel_passes: Annotated[int, typer.Option(help="sampling: passes walked in lockstep.")] = 1,
    all_passes: Annotated[bool, typer.Option("--all-passes/--stop-at-proof", help="sampling: run all passes even after a proof and count the successful ones (lower-variance pass@n; costs the full budget on proved theorems).")] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per tactic at most.")] = 96,
    beam: Annotated[bool, typer.Option(help="Beam search instead of sampling.")] = False,
    device: Annotated[Optional[str], typer.Option(help="transformers device (cpu, cuda).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Model dtype (float32, bfloat16, auto).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of model sampling, the oracle and the sampling strategy.")] = 0,
    run_dir: Annotated[Path, typer.Option(help="Where config, results.jsonl, summary.json, table.md and plots go.")] = Path("runs/eval"),
    resume: Annotated[bool, typer.Option(help="Continue the run in --run-dir, skipping recorded theorems.")] = False,
    limit: Annotated[Optional[int], typer.Option(help="The first N theorems of each benchmark only.")] = None,
    workers: Annotated[int, typer.Option(help="Prover workers (Ray actors or threads), each with its own environment.")] = 1,
    ray: Annotated[Optional[bool], typer.Option("--ray/--no-ray", help="Ray actors (default: when installed and --workers > 1 or --ray-address).")] = None,
    ray_address: Annotated[Optional[str], typer.Option(help="Join this Ray cluster instead of starting a local one (default: $RAY_ADDRESS when set).")] = None,
    cpus_per_prover: Annotated[float, typer.Option(help="Ray CPUs per prover actor.")] = 1.0,
    gpu_fraction_per_model: Annotated[float, typer.Option(help="Ray GPUs per generator actor (several models share a GPU; 0: planned from the cluster's GPUs); vLLM's memory fraction follows it.")] = 0.0,
    max_retries: Annotated[int, typer.Option(help="Retries of a theorem whose worker died, before it is recorded as an error.")] = 2,
    task_timeout: Annotated[Optional[float], typer.Option(help="Seconds before a theorem's worker is presumed hung and replaced (default: from the budget).")] = None,
    batch_wait_ms: Annotated[Optional[float], typer.Option(help="Generator batcher: ms to wait for more states (default: adaptive, a quarter of a generate call).")] = None,
    batch_max_states: Annotated[int, typer.Option(help="Generator batcher: states per generate call at most.")] = 64,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar on stderr.")] = True,
) -> None:
    """Evaluate members and their ensemble on benchmarks: pass rates, Table 2, plots."""
    from prover.eval.config import (
        BenchmarkSpec,
        Distribution,
        EnvSpec,
        EvalConfig,
        EvalConfigError,
        GeneratorOptions,
        parse_members,
        resolve_benchmark,
    )
    from dataclasses import replace

    from prover.eval.config import parse_benchmark_arg
    from prover.eval.runner import EvalUnavailable, run_eval
    from prover.eval.rundir import RunDirectoryError
    from search.budget import Budget

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        sources = [parse_benchmark_arg(b, split) for b in (benchmark or ["leandojo"])]
        if split is not None and not any(src == "minif2f" or src.endswith(".jsonl") for src, _ in sources):
            raise EvalConfigError("--split applies to miniF2F (.jsonl) benchmarks only; a LeanDojo file is one split")
        benches: list[BenchmarkSpec] = [resolve_benchmark(src, sp) for src, sp in sources]
        if env is not None:
            env_kind = env.value
        else:  # each benchmark in its own environment: LeanDojo data in replay, miniF2F in the REPL
            env_kind = "replay" if any(b.format == "leandojo" for b in benches) else "repl"
            benches = [replace(b, env="replay" if b.format == "leandojo" else "repl") for b in benches]
        members = parse_members(
            split_list(models) or None, str(ensemble) if ensemble is not None else None, generator.value if generator else None, backend.value,
            endpoints=str(endpoints) if endpoints is not None else None, generator_url=generator_url, served_model=served_model,
            tokenizer=tokenizer,
        )
        if beam and any(m.kind == "openai" for m in members):
            raise EvalConfigError("beam search is not offered through model servers: sample (drop --beam)")
        if baseline is None:
            ce = [m.name for m in members if m.n_eff == 1]
            baseline_member = ce[0] if ce and len(members) > 1 and ensemble_mode.value != "mixture" else None
        else:
            baseline_member = None if baseline.lower() == "none" else baseline
        use_ray = ray
        if use_ray is None:
            use_ray = importlib.util.find_spec("ray") is not None and (workers > 1 or bool(ray_address or os.environ.get("RAY_ADDRESS")))
        elif use_ray and importlib.util.find_spec("ray") is None:
            raise EvalConfigError("--ray asked but Ray is not installed: pip install -e '.[dist]' (or use --no-ray)")
        config = EvalConfig(
            benchmarks=tuple(benches),
            members=tuple(members),
            env=EnvSpec(env_kind, tuple(b.path for b in benches if b.format == "leandojo"), tactic_latency),
            strategy=strategy.value,
            budget=Budget(
                max_depth=max_depth,
                time_limit_s=time_limit,
                max_expansions=max_expansions,
                tactics_per_expansion=tactics_per_expansion,
                max_passes=max_passes,
                tactic_timeout_s=tactic_timeout,
            ),
            ensemble=ensemble_mode.value,
            length_alpha=length_alpha,
            samples_per_step=samples_per_step,
            parallel_passes=parallel_passes,
            all_passes=all_passes,
            generator_options=GeneratorOptions(
                temperature=temperature,
                max_new_tokens=max_new_tokens,
                beam_search=beam,
                device=device,
                dtype=dtype,
                gpu_memory_fraction=gpu_fraction_per_model if gpu_fraction_per_model > 0 else 0.2,
                seed=seed,
            ),
            distribution=Distribution(
                workers=workers,
                use_ray=bool(use_ray),
                ray_address=ray_address,
                cpus_per_prover=cpus_per_prover,
                gpu_fraction_per_model=gpu_fraction_per_model,
                max_retries=max_retries,
                task_timeout_s=task_timeout,
                batch_max_states=batch_max_states,
                batch_wait_s=batch_wait_ms / 1000.0 if batch_wait_ms is not None else None,
            ),
            limit=limit,
            baseline=baseline_member,
            baseline_factor=baseline_factor,
        )
        if any(m.kind == "oracle" for m in members) and any((b.env or env_kind) != "replay" for b in benches):
            raise EvalConfigError("the oracle generator needs the replay environment (--env replay)")
    except (EvalConfigError, ValueError) as err:
        raise fail(str(err)) from err

    try:
        outcome = run_eval(config, run_dir, resume=resume, progress=progress, retry_errors=retry_errors)
    except EvalUnavailable as err:
        raise fail(f"nothing could start: {err}") from err
    except (RunDirectoryError, EvalConfigError) as err:
        raise fail(str(err)) from err
    typer.echo(f"run directory: {outcome.run_dir} ({outcome.new_theorems} theorem(s) evaluated now, {outcome.skipped} already recorded)")
    gave_up = outcome.report.gave_up
    if gave_up:
        typer.echo(f"{len(gave_up)} theorem(s) recorded as errors after {max_retries} retries of a failing worker", err=True)
    typer.echo(outcome.final_line())
    for info in outcome.summary["benchmarks"].values():
        replay = info.get("replayability") or {}
        if replay.get("not_replayable"):
            reasons = ", ".join(f"{reason} {n}" for reason, n in replay["reasons"].items())
            typer.echo(f"{info['label']}: {replay['not_replayable']} of {replay['theorems']} theorem(s) not replayable "
                       f"({reasons}): in the denominator as not proved")
    errors = outcome.summary.get("errors", 0)
    if errors:
        examples = [e for info in outcome.summary["benchmarks"].values() for e in info["rows"]["ensemble"]["error_examples"]]
        typer.echo(f"{errors} theorem(s) ended in an error (not a failure; `--resume` retries them). First: "
                   f"{examples[0]['theorem_id']}: {examples[0]['error']}" if examples else f"{errors} theorem(s) ended in an error", err=True)
    ok = outcome.summary["complete"] and not errors
    raise typer.Exit(code=EXIT_OK if ok else EXIT_NOT_DONE)
