"""`dco-prover keys list | add | revoke | rotate`: the service's API keys.

The key file format belongs to `service.auth`; this command runs `python -m service.manage
keys ...` in a subprocess with the same config resolution as `dco-prover serve`
(`--config`, `--data-dir`), so `prover` never imports `service` (dependencies point
service → prover).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from prover.cli.serve import service_env

app = typer.Typer(help="Manage the service's API keys (scopes, per-key limits, revocation).", no_args_is_help=True)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="Service config (YAML or TOML), as for `serve`.")]
DataDirOpt = Annotated[Optional[Path], typer.Option(help="The service's data directory (overrides the config's data_dir).")]


def _run(args: list[str], config: Path | None, data_dir: Path | None) -> None:
    if config is not None and not config.is_file():
        typer.echo(f"error: config file {config} does not exist", err=True)
        raise typer.Exit(code=2)
    code = subprocess.call([sys.executable, "-m", "service.manage", "keys", *args], env=service_env(config, data_dir))
    raise typer.Exit(code=code)


@app.command("list")
def list_command(config: ConfigOpt = None, data_dir: DataDirOpt = None,
                 json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List keys with their scopes, limits and state (secrets are never stored)."""
    _run(["list", *(["--json"] if json_out else [])], config, data_dir)


@app.command("add")
def add_command(
    name: Annotated[str, typer.Argument(help="Key id: letters, digits, '-' and '_'.")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    scopes: Annotated[str, typer.Option(help="Comma-separated scopes: prove,check.")] = "prove,check",
    rate_per_s: Annotated[Optional[float], typer.Option(help="Requests per second (default: the server's).")] = None,
    burst: Annotated[Optional[int], typer.Option(help="Token-bucket size in requests.")] = None,
    max_concurrent_jobs: Annotated[Optional[int], typer.Option(help="Queued + running jobs.")] = None,
    max_open_streams: Annotated[Optional[int], typer.Option(help="Open event streams.")] = None,
    max_concurrent_checks: Annotated[Optional[int], typer.Option(help="/v1/check requests in flight.")] = None,
) -> None:
    """Create a key and print it once (only its salted hash is stored)."""
    args = ["add", name, "--scopes", scopes]
    for flag, value in (("--rate-per-s", rate_per_s), ("--burst", burst), ("--max-concurrent-jobs", max_concurrent_jobs),
                        ("--max-open-streams", max_open_streams), ("--max-concurrent-checks", max_concurrent_checks)):
        if value is not None:
            args += [flag, str(value)]
    _run(args, config, data_dir)


@app.command("revoke")
def revoke_command(name: Annotated[str, typer.Argument(help="Key id.")], config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Revoke a key for good; a running server refuses it within a second."""
    _run(["revoke", name], config, data_dir)


@app.command("rotate")
def rotate_command(name: Annotated[str, typer.Argument(help="Key id.")], config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Give a key a new secret (printed once), keeping its id, scopes and limits; the old secret is revoked."""
    _run(["rotate", name], config, data_dir)
