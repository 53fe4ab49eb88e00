"""`dco-prover pipeline`: the end-to-end job on its embedded default (see `prover.pipeline`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

err_console = Console(stderr=True)


def pipeline_command(
    output_dir: Annotated[Path, typer.Option(help="Run directory (re-run the same command to resume).")] = Path("runs/pipeline"),
    data: Annotated[Optional[Path], typer.Option(help="LeanDojo Benchmark 4 JSON (default: the bundled sample).")] = None,
    config: Annotated[str, typer.Option("--config", "-c", help="Training config: bundled name ('tiny', 'default') or YAML.")] = "tiny",
    n_eff: Annotated[Optional[list[int]], typer.Option("--n-eff", help="N_eff per member; repeat: --n-eff 1 --n-eff 16.")] = None,
    heldout_fraction: Annotated[float, typer.Option(help="Theorems never trained on, searched as the held-out column.")] = 0.2,
    epochs: Annotated[Optional[float], typer.Option(help="Override the training config's epochs.")] = None,
    strategy: Annotated[str, typer.Option(help="sampling (pass@N) or best_first.")] = "sampling",
    max_passes: Annotated[int, typer.Option(help="sampling: passes per member and theorem (pass@N).")] = 32,
    max_expansions: Annotated[int, typer.Option(help="best_first: expansions per member and theorem.")] = 32,
    time_limit: Annotated[float, typer.Option(help="Wall-clock seconds per theorem and member.")] = 120.0,
    max_depth: Annotated[int, typer.Option(help="Proof steps at most.")] = 50,
    seed: Annotated[int, typer.Option()] = 0,
    workers: Annotated[int, typer.Option(help="Prover workers for the search stage.")] = 1,
    baseline: Annotated[bool, typer.Option("--baseline/--no-baseline", help="Also search the N_eff=1 member with M× the budget (the equal-compute row).")] = True,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Train CE and DCO members, measure their confidence, search train and held-out theorems, report."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    from prover.pipeline import PipelineSettings, run_pipeline
    from search.budget import Budget
    from training.config import ConfigError

    if strategy not in ("sampling", "best_first"):
        err_console.print(f"[bold red]error:[/] --strategy must be sampling or best_first, got {strategy!r}")
        raise typer.Exit(code=2)
    # Per-file load/save bars of the hub libraries drown the stage log; the stages have their own.
    disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        settings = PipelineSettings(
            output_dir=output_dir,
            data=data,
            train_config=config,
            train_overrides={"epochs": epochs} if epochs is not None else {},
            n_effs=tuple(n_eff) if n_eff else PipelineSettings.n_effs,
            heldout_fraction=heldout_fraction,
            seed=seed,
            strategy=strategy,
            budget=Budget(max_depth=max_depth, time_limit_s=time_limit, max_passes=max_passes, max_expansions=max_expansions),
            workers=workers,
            progress=progress,
            baseline=baseline,
        )
        result = run_pipeline(settings, log=lambda line: err_console.print(line, highlight=False, soft_wrap=True))
    except (ConfigError, ValueError, KeyError, FileNotFoundError) as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=1) from None
    typer.echo(result.report_md.read_text())
    typer.echo(f"report: {result.report_md} (JSON: {result.report_json})")
