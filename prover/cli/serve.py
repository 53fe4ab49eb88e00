"""`dco-prover serve`: run the HTTP service (uvicorn) with a config file.

The app is handed to uvicorn as the import string `service.app:app_from_env`, and key
management runs `python -m service.manage`, so `prover` never imports `service`
(nothing does). Without `--config` the embedded default runs: SQLite under `--data-dir`,
real Lean when it is installed; otherwise `/readyz` says what is missing and job
submissions answer 503 with that reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

APP_FACTORY = "service.app:app_from_env"
CONFIG_ENV = "DCO_SERVICE_CONFIG"  # read by service.app.app_from_env
OVERRIDES_ENV = "DCO_SERVICE_OVERRIDES"


def service_env(config: Path | None, data_dir: Path | None) -> dict[str, str]:
    """The environment `service.app` / `service.manage` read their config from."""
    env = dict(os.environ)
    if config is not None:
        env[CONFIG_ENV] = str(config.resolve())
    else:
        env.pop(CONFIG_ENV, None)
    overrides = {"data_dir": str(data_dir.resolve())} if data_dir is not None else {}
    env[OVERRIDES_ENV] = json.dumps(overrides)
    return env


def serve_command(
    config: Annotated[Optional[Path], typer.Option("--config", help="Service config (YAML or TOML); see service/config.py.")] = None,
    host: Annotated[str, typer.Option(help="Address to bind. Keep loopback unless a TLS proxy fronts the service.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    data_dir: Annotated[Optional[Path], typer.Option(help="Job store and key file directory (overrides the config's data_dir).")] = None,
    add_key: Annotated[Optional[str], typer.Option("--add-key", help="Create API key NAME, print it once, and exit (same as `dco-prover keys add NAME`).")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve the proof API until interrupted."""
    if config is not None and not config.is_file():
        typer.echo(f"error: config file {config} does not exist", err=True)
        raise typer.Exit(code=2)
    env = service_env(config, data_dir)
    if add_key is not None:
        code = subprocess.call([sys.executable, "-m", "service.manage", "add-key", add_key], env=env)
        raise typer.Exit(code=code)

    import uvicorn

    os.environ.update({k: v for k, v in env.items() if k in (CONFIG_ENV, OVERRIDES_ENV)})
    if CONFIG_ENV not in env:
        os.environ.pop(CONFIG_ENV, None)
    uvicorn.run(APP_FACTORY, factory=True, host=host, port=port, log_level=log_level, workers=1, timeout_graceful_shutdown=15)
