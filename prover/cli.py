"""The `dco-prover` command line: one subcommand per job.

Each job's implementation lives in its own module and is imported lazily, so `--help`
and `doctor` stay fast and work without the optional extras.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="dco-prover",
    help="Lean 4 theorem proving with step-wise DCO-trained models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Lean 4 theorem proving with step-wise DCO-trained models."""


def _register() -> None:
    from prover import doctor

    app.command("doctor", help="Report what this machine can run and how to get what is missing.")(doctor.doctor_command)
    try:
        from prover import cli_train

        app.command("train", help="Fine-tune one checkpoint per N_eff with step-wise DCO.")(cli_train.train_command)
        app.command("diagnose", help="Greedy-completion confidence per checkpoint (JSON + histogram).")(cli_train.diagnose_command)
    except ImportError:  # pragma: no cover - module lands with the trainer
        pass
    try:
        from prover import cli_prove

        app.command("prove", help="Search for a proof of one theorem.")(cli_prove.prove_command)
    except ImportError:  # pragma: no cover
        pass
    try:
        from prover import cli_lean

        app.command("setup-lean", help="Install elan, the pinned Lean toolchain, Mathlib cache and the REPL.")(cli_lean.setup_lean_command)
    except ImportError:  # pragma: no cover
        pass


_register()


def main() -> None:  # pragma: no cover
    app()
