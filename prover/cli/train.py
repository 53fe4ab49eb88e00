"""`dco-prover train` and `dco-prover diagnose`: the training side of the command line.

`train` fits one checkpoint per N_eff, sequentially, into `OUTPUT_DIR/neff-N/` (each a
resumable run: re-running the same command continues a killed run and skips finished
ones) and writes `OUTPUT_DIR/ensemble.json` naming them. `diagnose` measures the
greedy-completion confidence of checkpoints (the paper's Figure 1).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from training.config import ConfigError, TrainConfig, load_config
from training.data import DataFormatError
from training.ensemble import MANIFEST_NAME, EnsembleMember, ManifestError, read_manifest


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's input; anything else is a bug and keeps its traceback.

    Evaluated only when an exception is being matched, so `import prover.cli` does not
    pay for torch and transformers (`training.modeling`)."""
    from training.modeling import ModelLoadError
    from training.trainer import TrainingOutOfMemory

    return (ConfigError, ManifestError, ModelLoadError, DataFormatError, FileNotFoundError, TrainingOutOfMemory)

err_console = Console(stderr=True)


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=1)


def parse_n_effs(values: list[str] | None, extra: list[str] | None) -> list[int] | None:
    """N_eff values from `--n-eff 1 4 8` (the first after the flag, the rest positional) or
    `--n-eff 1,4,8`; None when none given. Raises `ConfigError` for non-integers,
    values below 1 and repeats."""
    if extra and not values:
        raise ConfigError(f"unexpected arguments {' '.join(extra)}: N_eff values follow --n-eff")
    tokens = [t for v in [*(values or []), *(extra or [])] for t in v.replace(",", " ").split()]
    if not tokens:
        return None
    try:
        n_effs = [int(t) for t in tokens]
    except ValueError:
        raise ConfigError(f"--n-eff takes positive integers, got {' '.join(tokens)}") from None
    if any(n < 1 for n in n_effs):
        raise ConfigError(f"--n-eff values must be >= 1, got {' '.join(tokens)}")
    if len(set(n_effs)) != len(n_effs):
        raise ConfigError(f"--n-eff values repeat: {' '.join(tokens)}")
    return n_effs


def train_command(
    n_eff_values: Annotated[Optional[list[str]], typer.Argument(
        metavar="[N_EFF]...", help="Further N_eff values after --n-eff (as in --n-eff 1 4 8 16 32).",
        show_default=False)] = None,
    config: Annotated[Optional[str], typer.Option(
        "--config", "-c", help="YAML config file, or a bundled one: 'tiny' (CPU, offline) or 'default' (the paper).")] = None,
    n_eff: Annotated[Optional[list[str]], typer.Option(
        "--n-eff", help="N_eff of each checkpoint: --n-eff 1 4 8 16 32 (1 = cross-entropy).", show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option(help="Base model: HF id, local dir, or 'tiny-qwen2'.")] = None,
    data: Annotated[Optional[Path], typer.Option(help="LeanDojo Benchmark 4 JSON (default: the bundled sample).")] = None,
    output_dir: Annotated[Optional[Path], typer.Option(help="Run directory; one sub-directory per N_eff.")] = None,
    loss: Annotated[Optional[str], typer.Option(help="stepwise | proof_level.")] = None,
    epsilon: Annotated[Optional[float], typer.Option(help="Replacement threshold on F (paper 0.3; 0 = off).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Examples per optimizer step (all processes).")] = None,
    micro_batch_size: Annotated[Optional[int], typer.Option(help="Examples per forward pass per process.")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Passes over the training split.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Cap on optimizer steps.")] = None,
    bf16: Annotated[Optional[bool], typer.Option("--bf16/--no-bf16", help="bf16 mixed precision.")] = None,
    gradient_checkpointing: Annotated[Optional[bool], typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing")] = None,
    torch_compile: Annotated[Optional[bool], typer.Option(
        "--compile/--no-compile", help="torch.compile the decoder (GPU).")] = None,
    deepspeed: Annotated[Optional[Path], typer.Option(help="DeepSpeed JSON (training/configs/deepspeed_zero2.json, ..._zero3.json).")] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Discard existing runs in the output dir.")] = False,
    progress: Annotated[Optional[bool], typer.Option("--progress/--no-progress")] = None,
) -> None:
    """Fine-tune one checkpoint per N_eff with step-wise DCO and write the ensemble manifest."""
    from training.ensemble_training import member_configs, train_ensemble
    from training.trainer import distributed_state

    try:
        n_effs = parse_n_effs(n_eff, n_eff_values)
        overrides = dict(model=model, data=data, loss=loss, epsilon=epsilon, lr=lr, batch_size=batch_size,
                         micro_batch_size=micro_batch_size, epochs=epochs, max_steps=max_steps, bf16=bf16,
                         gradient_checkpointing=gradient_checkpointing, torch_compile=torch_compile, deepspeed=deepspeed, seed=seed,
                         progress=progress, overwrite=overwrite or None)
        base = load_config(config, **overrides)
        root = output_dir or base.output_dir
        runs = member_configs(base, n_effs, root)
    except _user_errors() as exc:
        raise _fail(str(exc)) from None

    def announce(run: TrainConfig) -> None:
        err_console.print(f"training N_eff={run.n_eff} ({run.model}) -> {run.output_dir}")

    manifest = root / MANIFEST_NAME
    try:
        members = train_ensemble(runs, manifest, on_start=announce)
    except _user_errors() as exc:
        raise _fail(str(exc)) from None
    if distributed_state().is_main_process:
        _print_members(members, manifest)


def _print_members(members: list[EnsembleMember], manifest: Path) -> None:
    table = Table(title=f"ensemble: {manifest}")
    for column in ("member", "steps", "train loss", "mean F", "eval NLL", "discarded", "checkpoint"):
        table.add_column(column)
    for m in members:
        fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
        table.add_row(m.name, str(m.steps), fmt(m.metrics.get("loss")), fmt(m.metrics.get("mean_F")),
                      fmt(m.metrics.get("eval_nll")), str(m.metrics.get("discarded_total", 0)), m.checkpoint)
    Console(stderr=True).print(table)


def diagnose_command(
    checkpoints: Annotated[Optional[list[Path]], typer.Argument(
        help="Checkpoint directories (Hugging Face format).", show_default=False)] = None,
    manifest: Annotated[Optional[Path], typer.Option(help="Ensemble manifest (ensemble.json or its directory).")] = None,
    output_dir: Annotated[Path, typer.Option(help="Where confidence.json and confidence.png go.")] = Path("runs/diagnostics"),
    data: Annotated[Optional[Path], typer.Option(help="LeanDojo Benchmark 4 JSON (default: the bundled sample).")] = None,
    split: Annotated[str, typer.Option(help="all | train | eval (the by-theorem split of --eval-fraction, --seed).")] = "all",
    eval_fraction: Annotated[Optional[float], typer.Option(help="Default: as the first checkpoint was trained.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Default: as the first checkpoint was trained.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy decoding length cap (tokens).")] = 64,
    max_length: Annotated[Optional[int], typer.Option(
        help="Prompt + completion tokens, state truncated from the left (default: as trained, else 1024).")] = None,
    max_examples: Annotated[Optional[int], typer.Option(help="Use only the first N examples.")] = None,
    batch_size: Annotated[int, typer.Option()] = 16,
) -> None:
    """Greedy-completion confidence p(y_greedy|x) per checkpoint: JSON plus histogram PNG."""
    from training.diagnostics import diagnose

    try:
        if split not in ("all", "train", "eval"):
            raise ConfigError(f"--split must be all, train or eval, got {split!r}")
        named: dict[str, Path] = {}
        if manifest is not None:
            for member in read_manifest(manifest).members:
                named[member.name] = Path(member.checkpoint)
        for path in checkpoints or []:
            if not path.is_dir():
                raise ConfigError(f"checkpoint directory not found: {path}")
            name = path.resolve().parent.name if path.resolve().name == "final" else path.resolve().name
            while name in named:
                name += "'"
            named[name] = path
        if not named:
            raise ConfigError("give checkpoint directories or --manifest")
        report = diagnose(named, output_dir, data=data, split=split, eval_fraction=eval_fraction, seed=seed,  # type: ignore[arg-type]
                          max_length=max_length, max_new_tokens=max_new_tokens, max_examples=max_examples,
                          batch_size=batch_size)
    except _user_errors() as exc:
        raise _fail(str(exc)) from None
    table = Table(title="greedy-completion confidence")
    for column in ("checkpoint", "examples", "mean p", "median p", "p > 0.5", "exact match"):
        table.add_column(column)
    for name, s in report.summaries.items():
        table.add_row(name, str(s.get("examples", 0)), f"{s.get('mean_p', 0):.4f}", f"{s.get('median_p', 0):.4f}",
                      f"{s.get('fraction_p_above_0.5', 0):.3f}", f"{s.get('exact_match', 0):.3f}")
    Console(stderr=True).print(table)
    print(json.dumps({"json": str(report.json_path), "png": str(report.png_path)}), file=sys.stdout)
