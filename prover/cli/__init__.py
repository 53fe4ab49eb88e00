"""The `dco-prover` command line: one subcommand per job.

Each job lives in its own module of this package; those modules import their heavy
dependencies (torch, transformers, Ray, uvicorn) inside the commands, so `--help` and
`doctor` stay fast and work without the optional extras.
"""

from __future__ import annotations

import typer

from prover import doctor
from prover.cli import evaluate, expert, keys, lean, pipeline, prove, serve, serve_models, train

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


app.command("doctor", help="Report what this machine can run and how to get what is missing.")(doctor.doctor_command)
app.command("pipeline", help="End to end: train CE and DCO models, search held-out theorems, write a Table-2 report.")(pipeline.pipeline_command)
app.command("train", help="Fine-tune one checkpoint per N_eff with step-wise DCO and write the ensemble manifest.")(train.train_command)
app.command("diagnose", help="Greedy-completion confidence per checkpoint (JSON + histogram, the paper's Figure 1).")(train.diagnose_command)
app.command("prove", help="Search for a proof of one theorem.")(prove.prove_command)
app.command("eval", help="Batch evaluation of members and ensemble on a benchmark (resumable, Ray).")(evaluate.eval_command)
app.command("expert-iteration", help="Prove unproved theorems, add the verified steps to the data, retrain every N_eff, evaluate; repeat.")(expert.expert_iteration_command)
app.command("serve", help="Run the HTTP proof service.")(serve.serve_command)
app.command("serve-models", help="One vLLM OpenAI server per ensemble member (memory planned, started one after another); writes the endpoints manifest.")(serve_models.serve_models_command)
app.add_typer(keys.app, name="keys", help="Manage the service's API keys: list | add | revoke | rotate.")
app.command("setup-lean", help="Install elan, the pinned Lean toolchain, the Mathlib cache and the REPL.")(lean.setup_lean_command)


def main() -> None:  # pragma: no cover
    app()


