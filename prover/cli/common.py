"""What the CLI commands share: exit codes, choice enums, the error exit, list options."""

from __future__ import annotations

import enum

import typer

EXIT_OK = 0
EXIT_NOT_DONE = 1  # not proved / run incomplete
EXIT_USAGE = 2  # bad input: unknown theorem, bad flags, missing checkpoint, Lean missing


class StrategyChoice(str, enum.Enum):
    best_first = "best_first"
    sampling = "sampling"


class EnvChoice(str, enum.Enum):
    replay = "replay"
    repl = "repl"
    dojo = "dojo"


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    """Print `error: message` on stderr and return the exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=code)


def split_list(values: list[str] | None) -> list[str]:
    """`--models a --models b` and `--models a,b` both give [a, b]."""
    return [part.strip() for value in values or () for part in value.split(",") if part.strip()]
