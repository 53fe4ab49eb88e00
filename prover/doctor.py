"""`dco-prover doctor`: what this machine can run, and how to get what is missing.

Each check is a `Check` record; the command prints them as a table (or JSON) and exits
non-zero only when the default CPU pipeline itself cannot run (torch/transformers missing).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import typer


@dataclass(frozen=True)
class Check:
    """One capability. `required` checks are needed by the default (CPU, replay) pipeline."""

    name: str
    ok: bool
    detail: str
    how_to_fix: str = ""
    required: bool = False


def _module_version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        from importlib.metadata import version

        dist = {"lean_dojo": "lean-dojo", "sklearn": "scikit-learn"}.get(module, module)
        return version(dist)
    except Exception:  # noqa: BLE001 - a module without metadata is still importable
        return "unknown version"


def _python_package(name: str, module: str, fix: str, required: bool = False) -> Check:
    found = _module_version(module)
    if found is None:
        return Check(name, False, "not installed", fix, required)
    return Check(name, True, found, "", required)


def _gpu_check() -> Check:
    fix = "on a GPU machine install a CUDA build of torch (CPU training and search still work without one)"
    try:
        import torch
    except ImportError:
        return Check("GPU / CUDA", False, "torch not installed", fix)
    if not torch.cuda.is_available():
        return Check("GPU / CUDA", False, f"torch {torch.__version__}: no CUDA device visible", fix)
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return Check("GPU / CUDA", True, f"{torch.cuda.device_count()} device(s): {names}")


def _lean_checks() -> list[Check]:
    try:
        from prover.lean.readiness import lean_readiness
    except ImportError:
        lake = shutil.which("lake")
        return [
            Check(
                "Lean toolchain (lake)",
                lake is not None,
                lake or "lake not on PATH",
                "" if lake else "run `dco-prover setup-lean` (needs internet: elan, Lean v4.24.0, Mathlib cache)",
            )
        ]
    return [Check(c.name, c.ok, c.detail, c.how_to_fix) for c in lean_readiness()]  # incl. "Lean sandbox"


def _checkpoint_checks(manifest: Path | None) -> list[Check]:
    if manifest is None:
        return [
            Check(
                "configured checkpoints",
                True,
                "none configured (pass --ensemble MANIFEST to check one); the default job builds tiny-qwen2 locally",
            )
        ]
    if not manifest.exists():
        return [Check("ensemble manifest", False, f"{manifest} does not exist", "train with `dco-prover train --n-eff ...`, which writes ensemble.json")]
    try:
        from training.ensemble import read_manifest

        members = read_manifest(manifest).members
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return [Check("ensemble manifest", False, f"{manifest}: {exc}", "re-run `dco-prover train` or fix the manifest")]
    return [Check(f"checkpoint {m.name}", True, str(m.path)) for m in members]


def run_checks(manifest: Path | None = None) -> list[Check]:
    """All checks, in display order."""
    checks = [
        _python_package("torch", "torch", "pip install torch==2.13.0 (CPU) or a CUDA build on GPU machines", required=True),
        _python_package("transformers", "transformers", "pip install -e .", required=True),
        _python_package("datasets", "datasets", "pip install -e .", required=True),
        _python_package("accelerate", "accelerate", "pip install -e .", required=True),
        _gpu_check(),
        _python_package("vLLM", "vllm", "pip install -e '.[gpu]' on a CUDA machine (falls back to transformers generation)"),
        _python_package("DeepSpeed", "deepspeed", "pip install -e '.[gpu]' (needed only for ZeRO multi-GPU training)"),
        _python_package("Ray", "ray", "pip install -e '.[dist]' (needed for distributed evaluation)"),
        _python_package("LeanDojo", "lean_dojo", "pip install -e '.[lean]' (needed for the Mathlib benchmark through Dojo)"),
    ]
    checks.extend(_lean_checks())
    checks.extend(_checkpoint_checks(manifest))
    return checks


def doctor_command(
    ensemble: Path = typer.Option(None, "--ensemble", help="Ensemble manifest whose checkpoints to check."),
    as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON."),
) -> None:
    """Report what this machine can run and how to get what is missing."""
    checks = run_checks(ensemble)
    if as_json:
        typer.echo(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        table = Table(title="dco-prover doctor")
        for column in ("capability", "status", "detail", "how to get it"):
            table.add_column(column, overflow="fold")
        for c in checks:
            status = "[green]ok[/green]" if c.ok else ("[red]MISSING[/red]" if c.required else "[yellow]missing[/yellow]")
            table.add_row(escape(c.name), status, escape(c.detail), escape(c.how_to_fix))
        Console().print(table)
    if any(c.required and not c.ok for c in checks):
        raise typer.Exit(code=1)
