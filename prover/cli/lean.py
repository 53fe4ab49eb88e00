"""`dco-prover setup-lean`: install elan, the pinned toolchain, the Mathlib cache and the REPL.

Needs internet access; it first probes the hosts it needs and stops with a message naming
each unreachable one. Disk and time needs (approximate): ~8-10 GB (toolchain ~1 GB, Mathlib
sources ~1 GB, Mathlib .olean cache ~5-7 GB) and ~10-25 minutes; see lean_project/README.md.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import typer

from prover.lean.paths import LEAN_TOOLCHAIN, elan_home, lean_project_dir, repl_binary
from prover.lean.readiness import find_tool, lean_readiness

__all__ = ["setup_lean_command", "REQUIRED_URLS", "probe_urls", "ProbeResult", "SMOKE_THEOREM"]

ELAN_INIT_URL = "https://raw.githubusercontent.com/leanprover/elan/master/elan-init.sh"

# What each step downloads from: the elan script, git clones and toolchain releases, the
# Mathlib build cache.
REQUIRED_URLS: tuple[str, ...] = (
    ELAN_INIT_URL,
    "https://github.com/leanprover-community/mathlib4",
    "https://lakecache.blob.core.windows.net/",
)

SMOKE_THEOREM = "theorem smoke (a b : ℕ) : a + b = b + a := by"
SMOKE_TACTIC = "omega"


@dataclass(frozen=True)
class ProbeResult:
    url: str
    ok: bool
    detail: str


def _probe(url: str, timeout_s: float) -> ProbeResult:
    req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "dco-prover-setup"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 - fixed URLs
            return ProbeResult(url, True, f"HTTP {resp.status}")
    except urllib.error.HTTPError as e:
        return ProbeResult(url, True, f"HTTP {e.code}")
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return ProbeResult(url, False, f"{type(reason).__name__}: {reason}")


def probe_urls(urls: Sequence[str], timeout_s: float = 8.0) -> list[ProbeResult]:
    """HEAD each URL in parallel (at most `timeout_s` seconds in all, plus DNS); any HTTP
    answer, even 4xx, proves the host is reachable. Results are in the order of `urls`."""
    with ThreadPoolExecutor(max_workers=max(1, len(urls))) as pool:
        return list(pool.map(lambda u: _probe(u, timeout_s), urls))


def _run(cmd: Sequence[str], cwd: Path | None, env: dict[str, str], what: str) -> None:
    typer.echo(f"$ {' '.join(cmd)}" + (f"   (in {cwd})" if cwd else ""))
    started = time.monotonic()
    try:
        result = subprocess.run(list(cmd), cwd=cwd, env=env)
    except FileNotFoundError as e:
        typer.secho(f"{what} failed: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from e
    if result.returncode != 0:
        typer.secho(f"{what} failed with exit code {result.returncode}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    typer.echo(f"  {what}: done in {time.monotonic() - started:.0f} s")


def _install_elan(env: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "elan-init.sh"
        if shutil.which("curl"):
            _run(["curl", "-sSfL", "-o", str(script), ELAN_INIT_URL], None, env, "downloading elan-init.sh")
        else:
            urllib.request.urlretrieve(ELAN_INIT_URL, script)  # noqa: S310 - fixed https URL
        _run(["sh", str(script), "-y", "--default-toolchain", "none"], None, env, "installing elan")


def _smoke_test(project: Path, timeout_s: float) -> None:
    from prover.lean.process import ReplConfig
    from prover.lean.repl_env import ReplEnvironment
    from search.types import Proved, Theorem

    config = ReplConfig(cwd=project, header_timeout_s=timeout_s, verify_timeout_s=timeout_s)
    theorem = Theorem("smoke", SMOKE_THEOREM, "import Mathlib")
    started = time.monotonic()
    with ReplEnvironment(config, max_processes=1) as env:
        root = env.start(theorem)
        typer.echo(f"  root goal: {root.pp!r}")
        result = env.apply(root, SMOKE_TACTIC)
        if not isinstance(result, Proved):
            typer.secho(f"smoke test: `{SMOKE_TACTIC}` gave {result}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1)
        verification = env.verify(theorem, [SMOKE_TACTIC])
        if not verification.ok:
            typer.secho(f"smoke test: verification failed: {verification.message}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1)
    typer.echo(f"  smoke test passed in {time.monotonic() - started:.0f} s ({verification.message})")


def _install_sandbox() -> None:
    """bubblewrap sandboxes the Lean processes (prover.lean.sandbox): installed with apt-get
    when running as root on Debian/Ubuntu and missing; otherwise the command to run is shown."""
    if shutil.which("bwrap"):
        return
    apt = shutil.which("apt-get")
    if apt and hasattr(os, "geteuid") and os.geteuid() == 0:
        typer.echo("Installing bubblewrap (the Lean sandbox) ...")
        done = subprocess.run([apt, "install", "-y", "bubblewrap"], capture_output=True, text=True)
        if done.returncode != 0:
            subprocess.run([apt, "update"], capture_output=True, text=True)
            done = subprocess.run([apt, "install", "-y", "bubblewrap"], capture_output=True, text=True)
        if done.returncode == 0 and shutil.which("bwrap"):
            return
        typer.secho(f"could not install bubblewrap: {done.stderr.strip()[-300:]}", fg=typer.colors.YELLOW, err=True)
    typer.secho(
        "bubblewrap is missing: Lean will run UNSANDBOXED. Install it with `sudo apt-get install -y bubblewrap` "
        "(or set DCO_LEAN_SANDBOX=require to refuse to run Lean without it).",
        fg=typer.colors.YELLOW,
        err=True,
    )


def setup_lean_command(
    project: Optional[Path] = typer.Option(None, help="Lake project directory (default: lean_project/)."),
    skip_network_check: bool = typer.Option(False, help="Do not probe the download hosts first."),
    skip_cache: bool = typer.Option(False, help="Skip `lake exe cache get` (Mathlib then builds from source: hours)."),
    skip_smoke_test: bool = typer.Option(False, help="Do not run the one-theorem REPL smoke test."),
    smoke_timeout_s: float = typer.Option(900.0, help="Limit for importing Mathlib in the smoke test (seconds)."),
    probe_url: Optional[list[str]] = typer.Option(None, help="Override the URLs probed before installing (repeatable)."),
) -> None:
    """Install elan, Lean v4.24.0, Mathlib's build cache and the REPL; then smoke-test one theorem.

    Needs ~8-10 GB of disk and ~10-25 minutes with a good connection.
    """
    project = (project or lean_project_dir()).resolve()
    if not (project / "lakefile.toml").exists() and not (project / "lakefile.lean").exists():
        typer.secho(f"{project} is not a Lake project (no lakefile)", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)

    if not skip_network_check:
        urls = list(probe_url) if probe_url else list(REQUIRED_URLS)
        typer.echo("Checking network access ...")
        failed = [r for r in probe_urls(urls) if not r.ok]
        if failed:
            typer.secho("Cannot set up Lean: these download hosts are unreachable:", fg=typer.colors.RED, err=True)
            for r in failed:
                typer.secho(f"  {r.url}  ({r.detail})", fg=typer.colors.RED, err=True)
            typer.secho(
                "setup-lean needs internet access to GitHub (elan, toolchain, Mathlib sources) and to the "
                "Mathlib cache; run it on a connected machine and copy ~/.elan and lean_project/.lake over.",
                err=True,
            )
            raise typer.Exit(2)

    _install_sandbox()
    env = dict(os.environ)
    env["PATH"] = f"{elan_home() / 'bin'}{os.pathsep}{env.get('PATH', '')}"

    if find_tool("elan") is None:
        _install_elan(env)
    elan = find_tool("elan")
    if elan is None:
        typer.secho(f"elan is still missing after installation (looked in PATH and {elan_home() / 'bin'})", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    toolchain = (project / "lean-toolchain").read_text(encoding="utf-8").strip() or LEAN_TOOLCHAIN
    _run([str(elan), "toolchain", "install", toolchain], project, env, f"installing {toolchain}")
    lake = find_tool("lake")
    if lake is None:
        typer.secho("lake not found after installing the toolchain", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    if not skip_cache:
        _run([str(lake), "exe", "cache", "get"], project, env, "fetching Mathlib and its build cache")
    _run([str(lake), "build", "repl"], project, env, "building the REPL")
    if not repl_binary(project).exists():
        typer.secho(f"the REPL binary is missing after the build: {repl_binary(project)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    if not skip_smoke_test:
        os.environ["PATH"] = env["PATH"]  # the REPL client runs `lake env ...`
        _smoke_test(project, smoke_timeout_s)

    typer.echo("\nLean readiness:")
    for c in lean_readiness(project):
        mark = "ok " if c.ok else ("-- " if not c.required else "NO ")
        typer.echo(f"  [{mark}] {c.name}: {c.detail}")
    if shutil.which("lake") is None:
        typer.echo(f'\nAdd elan to your PATH: export PATH="{elan_home() / "bin"}:$PATH"')


if __name__ == "__main__":  # pragma: no cover
    app = typer.Typer(add_completion=False)
    app.command()(setup_lean_command)
    sys.exit(app())
