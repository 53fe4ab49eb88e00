"""`dco-prover expert-iteration`: search, harvest verified proofs, retrain, evaluate, repeat.

Settings come from an optional YAML file (`ExpertConfig` fields) with the flags below on
top. Re-running the same command in the same `--run-dir` resumes the run at the stage it
was in. Exit status: 0 done, 1 the run failed (resumable), 2 bad input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=code)


def expert_iteration_command(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file of ExpertConfig fields (see prover/expert_iteration/config.py).")] = None,
    run_dir: Annotated[Path, typer.Option(help="Run directory (resumed when it exists).")] = Path("runs/expert"),
    iterations: Annotated[Optional[int], typer.Option(help="Expert iterations after the initial training.")] = None,
    n_eff: Annotated[Optional[str], typer.Option(help="N_eff of the members, comma-separated: 1,4,8,16,32.")] = None,
    train_config: Annotated[Optional[str], typer.Option(help="Training YAML or a bundled name ('tiny', 'default').")] = None,
    data: Annotated[Optional[Path], typer.Option(help="LeanDojo JSON with proofs (default: the bundled sample).")] = None,
    unproved: Annotated[Optional[Path], typer.Option(help="LeanDojo JSON of theorems to prove (default: hold out part of --data).")] = None,
    holdout_fraction: Annotated[Optional[float], typer.Option(help="Share of --data's proved theorems whose proofs are withheld.")] = None,
    retrain_from: Annotated[Optional[str], typer.Option(help="base | previous (checkpoint of the previous iteration).")] = None,
    env: Annotated[Optional[str], typer.Option(help="replay | repl | dojo.")] = None,
    strategy: Annotated[Optional[str], typer.Option(help="Search stage: sampling (pass@N) or best_first.")] = None,
    max_passes: Annotated[Optional[int], typer.Option(help="Search stage: pass@N (paper: 1000).")] = None,
    eval_benchmark: Annotated[Optional[str], typer.Option(help="Evaluation benchmark (default: the initial unproved set).")] = None,
    search_generator: Annotated[Optional[str], typer.Option(help="Debug only: search with 'oracle' or 'fixed' instead of the ensemble.")] = None,
    backend: Annotated[Optional[str], typer.Option(help="transformers | vllm.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Prover workers of the search and evaluation stages.")] = None,
    ray_address: Annotated[Optional[str], typer.Option(help="Run searches on this Ray cluster.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Expert iteration (Table 4): prove the unproved set, add verified steps, retrain each N_eff, evaluate."""
    from prover.expert_iteration import ExpertConfigError, ExpertRunError, load_expert_config, run_expert_iteration

    try:
        n_effs = [int(x) for x in n_eff.replace(" ", "").split(",") if x] if n_eff else None
    except ValueError:
        raise _fail(f"--n-eff takes comma-separated integers, got {n_eff!r}") from None
    search = {k: v for k, v in (("strategy", strategy), ("max_passes", max_passes)) if v is not None}
    try:
        settings = load_expert_config(
            config, iterations=iterations, n_effs=n_effs, train_config=train_config, data=data, unproved=unproved,
            holdout_fraction=holdout_fraction, retrain_from=retrain_from, env=env, search=search or None,
            eval_benchmark=eval_benchmark, search_generator=search_generator, backend=backend, workers=workers,
            ray_address=ray_address)
    except ExpertConfigError as err:
        raise _fail(str(err)) from None
    try:
        outcome = run_expert_iteration(settings, run_dir, progress=progress)
    except ExpertRunError as err:
        raise _fail(str(err), code=1) from None
    typer.echo((outcome.run_dir / "summary.md").read_text())
    typer.echo(f"run directory: {outcome.run_dir} (summary.json, summary.md, summary.png)")
