"""`dco-prover prove`: search for a proof of one theorem and print it (or its JSON record).

Exit status: 0 proved, 1 searched but not proved, 2 bad input (unknown theorem, bad flag
values, missing checkpoint, unavailable environment). Heavy imports happen inside the
command so `dco-prover --help` stays fast.
"""

from __future__ import annotations

import enum
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from prover.cli.common import EXIT_NOT_DONE, EXIT_OK, EnvChoice, StrategyChoice, fail, split_list



class EnsembleChoice(str, enum.Enum):
    union = "union"
    mixture = "mixture"


class GeneratorChoice(str, enum.Enum):
    fixed = "fixed"
    oracle = "oracle"
    model = "model"
    openai = "openai"


def prove_command(
    statement: Annotated[Optional[str], typer.Option(help="A Lean declaration to prove, e.g. 'theorem t (n : Nat) : n + 0 = n'.")] = None,
    header: Annotated[str, typer.Option(help="Imports/opens for --statement (REPL environment).")] = "",
    benchmark: Annotated[Optional[str], typer.Option(help="Theorem file: LeanDojo JSON, miniF2F JSONL, or 'minif2f'. Default: the bundled LeanDojo sample.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Theorem name in --benchmark (a LeanDojo full name or a miniF2F name).")] = None,
    strategy: Annotated[StrategyChoice, typer.Option(help="best_first: priority search; sampling: pass@N trajectories.")] = StrategyChoice.best_first,
    max_depth: Annotated[int, typer.Option(help="Proof steps on a path at most.")] = 50,
    time_limit: Annotated[float, typer.Option(help="Wall-clock seconds for the theorem (per ensemble member for union).")] = 600.0,
    max_expansions: Annotated[int, typer.Option(help="best_first: node expansions at most.")] = 100,
    tactics_per_expansion: Annotated[int, typer.Option(help="best_first: candidates per expansion (k).")] = 8,
    max_passes: Annotated[int, typer.Option(help="sampling: passes from the root at most (pass@N).")] = 64,
    tactic_timeout: Annotated[float, typer.Option(help="Wall-clock seconds per tactic in Lean.")] = 10.0,
    length_alpha: Annotated[float, typer.Option(help="best_first: divide the path log-prob by depth^alpha (0 = off).")] = 0.0,
    samples_per_step: Annotated[int, typer.Option(help="sampling: tactics asked per step; one is drawn by probability.")] = 1,
    parallel_passes: Annotated[int, typer.Option(help="sampling: passes walked in lockstep (batched generator calls).")] = 1,
    models: Annotated[Optional[list[str]], typer.Option(help="Checkpoint directories or 'tiny-qwen2' (repeat or comma-separate).")] = None,
    ensemble: Annotated[Optional[Path], typer.Option(help="The trainer's ensemble manifest (one checkpoint per N_eff).")] = None,
    ensemble_mode: Annotated[EnsembleChoice, typer.Option(help="union: each member its own budget, first proof wins; mixture: merged candidates.")] = EnsembleChoice.union,
    generator: Annotated[Optional[GeneratorChoice], typer.Option(help="Default: model when --models/--ensemble is given, openai when --generator-url/--endpoints is, else fixed.")] = None,
    generator_url: Annotated[Optional[str], typer.Option(help="openai: a completions server (vllm serve) at http://HOST:PORT, one member.")] = None,
    endpoints: Annotated[Optional[Path], typer.Option(help="openai: the endpoints manifest written by `dco-prover serve-models` (one server per member).")] = None,
    served_model: Annotated[Optional[str], typer.Option(help="openai with --generator-url: the served model name (default: the only one the server lists).")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help="openai: the served checkpoint's directory (or hub id) whose tokenizer and prompt budget build the prompt tokens (default with --endpoints: each member's 'checkpoint').")] = None,
    env: Annotated[Optional[EnvChoice], typer.Option(help="Default: replay for a LeanDojo benchmark, repl for --statement and miniF2F.")] = None,
    device: Annotated[Optional[str], typer.Option(help="Model device (cpu, cuda, cuda:1).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Model dtype (float32, bfloat16, auto).")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature of the model.")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per generated tactic at most.")] = 96,
    beam: Annotated[bool, typer.Option(help="Beam search (k beams) instead of sampling.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the oracle, of model sampling and of the sampling strategy's draws.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result record as one JSON object.")] = False,
) -> None:
    """Search for a proof of one theorem. Exit 0 proved, 1 not proved, 2 bad input."""
    from prover.replay import ReplayEnvironment
    from prover.runner import EnvironmentUnavailable, GeneratorSpec, ProveSettings, make_environment, make_generators, prove
    from prover.theorems import TheoremNotFoundError, TheoremSourceError, find_theorem, load_theorems, theorem_from_statement
    from search.budget import Budget

    # -- the theorem
    if statement is not None and (name is not None or benchmark is not None):
        raise fail("give either --statement or --benchmark/--name, not both")
    try:
        if statement is not None:
            from prover.lean.untrusted import UntrustedInputError, check_header, check_statement

            try:  # the Lean backends' screen, up front: bad input is exit 2 naming the rule
                check_statement(statement)
                if header:
                    check_header(header)
            except UntrustedInputError as err:
                raise fail(str(err)) from err
            theorem = theorem_from_statement(statement, header=header)
            source_is_leandojo = False
        elif name is not None:
            theorems = load_theorems(benchmark)
            theorem = find_theorem(theorems, name)
            source_is_leandojo = "traced_tactics" in theorem.metadata
        else:
            raise fail("give the theorem: --statement TEXT, or --name NAME (with --benchmark FILE, default the bundled LeanDojo sample)")
    except (TheoremNotFoundError, TheoremSourceError, ValueError, FileNotFoundError) as err:
        message = err.args[0] if isinstance(err, LookupError) and err.args else str(err)
        raise fail(message) from err

    # -- settings
    model_list = tuple(split_list(models))
    generator_kind = (generator.value if generator is not None else ("model" if model_list or ensemble is not None else "openai" if generator_url is not None or endpoints is not None else "fixed"))
    env_kind = env.value if env is not None else ("replay" if source_is_leandojo else "repl")
    try:
        settings = ProveSettings(
            strategy=strategy.value,
            budget=Budget(
                max_depth=max_depth,
                time_limit_s=time_limit,
                max_expansions=max_expansions,
                tactics_per_expansion=tactics_per_expansion,
                max_passes=max_passes,
                tactic_timeout_s=tactic_timeout,
            ),
            ensemble_mode=ensemble_mode.value,
            length_alpha=length_alpha,
            samples_per_step=samples_per_step,
            parallel_passes=parallel_passes,
            seed=seed,
            env=env_kind,
            benchmark=benchmark if env_kind == "replay" and source_is_leandojo else None,
            generator=GeneratorSpec(
                kind=generator_kind,
                models=model_list,
                ensemble_manifest=str(ensemble) if ensemble is not None else None,
                device=device,
                dtype=dtype,
                temperature=temperature,
                max_new_tokens=max_new_tokens,
                beam_search=beam,
                oracle_seed=seed,
                generator_url=generator_url,
                endpoints=str(endpoints) if endpoints is not None else None,
                served_model=served_model,
                tokenizer=tokenizer,
            ),
        )
    except ValueError as err:
        raise fail(str(err)) from err

    # -- environment and generators
    if settings.env == "repl" and not theorem.statement:
        raise fail(
            f"theorem {theorem.id!r} has no statement text (LeanDojo benchmarks name theorems by file): "
            "use --env dojo (Lean and LeanDojo) or --env replay"
        )
    try:
        environment = make_environment(settings.env, benchmark=settings.benchmark) if settings.env == "replay" else make_environment(settings.env)
    except EnvironmentUnavailable as err:
        raise fail(str(err)) from err
    if isinstance(environment, ReplayEnvironment) and theorem.id not in environment:
        raise fail(
            f"theorem {theorem.id!r} cannot be opened by the replay environment (it is not in the replay "
            "data); use --env repl or --env dojo with Lean installed"
        )
    # A theorem of the data that is not replayable is searched all the same: `start` refuses
    # it, the record says `error` with the reason (`not replayable [...]`) and the exit is 1.
    try:
        if settings.generator.kind == "model":
            import torch

            torch.manual_seed(seed)
        generators = make_generators(settings.generator, env=environment)
    except Exception as err:  # GeneratorLoadError and ValueError carry the user-facing message
        from prover.generators.loading import GeneratorLoadError

        if isinstance(err, (GeneratorLoadError, ValueError)):
            raise fail(str(err)) from err
        raise

    # -- search
    with environment as entered:
        result = prove(theorem, entered, generators, settings)
    record = result.to_json()
    record["settings"] = settings.to_json()
    if as_json:
        typer.echo(json.dumps(record, ensure_ascii=False))
    else:
        _print_result(record)
    raise typer.Exit(code=EXIT_OK if result.proved else EXIT_NOT_DONE)


def _print_result(record: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    console = Console(file=sys.stdout)
    status = record["status"]
    colour = "green" if status == "proved" else "red"
    headline = Text(record["theorem_id"], style="bold")
    headline.append(": ").append(status, style=colour).append(f" ({record['strategy']})")
    console.print(headline)
    if record.get("proof"):
        body = "by\n" + "\n".join("  " + line for tactic in record["proof"] for line in tactic.splitlines())
        title = "proof" if record["verified"] else "proof (NOT verified)"
        console.print(Panel(Text(body), title=title, expand=False))
    if record.get("verification_message"):
        console.print(Text(f"verification: {record['verification_message']}"))
    table = Table(show_header=False, box=None)
    for key in ("member", "passes", "expansions", "lean_calls", "cache_hits", "cache_misses",
                "generator_calls", "generator_time_s", "lean_time_s", "wall_time_s", "max_depth_reached"):
        value = record.get(key)
        if isinstance(value, float):
            value = f"{value:.3f}"
        table.add_row(key, str(value))
    console.print(table)
    for message in record.get("errors", [])[:5]:
        console.print(Text("error ", style="yellow").append(message))
