"""Is this machine ready to run Lean? Checks for `dco-prover doctor` (no process is started).

`lean_readiness()` returns one `ReadinessCheck` per requirement, in set-up order: elan,
lake, the pinned toolchain, the Lake project, its Mathlib build cache, the built REPL,
and (optional) LeanDojo. `how_to_fix` is a command or instruction for a failed check.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from prover.lean.paths import (
    LEAN_TOOLCHAIN,
    MATHLIB_OLEAN_REL,
    elan_home,
    lean_project_dir,
    repl_binary,
    toolchain_dir_name,
)

__all__ = ["ReadinessCheck", "lean_readiness", "find_tool"]

SETUP = "dco-prover setup-lean"


@dataclass(frozen=True)
class ReadinessCheck:
    """One requirement: `ok`, what was found (`detail`), and how to fix it when not ok.

    `required` is False for optional backends (LeanDojo), which never make Lean unusable.
    """

    name: str
    ok: bool
    detail: str
    how_to_fix: str = ""
    required: bool = True


def find_tool(name: str) -> Path | None:
    """`name` on PATH, else in elan's bin directory (a fresh install is not on PATH yet)."""
    found = shutil.which(name)
    if found:
        return Path(found)
    candidate = elan_home() / "bin" / name
    return candidate if candidate.exists() and os.access(candidate, os.X_OK) else None


def lean_readiness(project: Path | None = None) -> list[ReadinessCheck]:
    project = project or lean_project_dir()
    checks: list[ReadinessCheck] = []

    elan = find_tool("elan")
    checks.append(
        ReadinessCheck("elan", elan is not None, str(elan) if elan else "elan not found on PATH or in ~/.elan/bin", SETUP)
    )
    lake = find_tool("lake")
    on_path = shutil.which("lake") is not None
    checks.append(
        ReadinessCheck(
            "lake",
            lake is not None,
            (f"{lake}" + ("" if on_path else " (not on PATH: add ~/.elan/bin)")) if lake else "lake not found",
            SETUP if lake is None else ("" if on_path else 'export PATH="$HOME/.elan/bin:$PATH"'),
        )
    )

    pinned = _read(project / "lean-toolchain")
    toolchain = pinned or LEAN_TOOLCHAIN
    tc_dir = elan_home() / "toolchains" / toolchain_dir_name(toolchain)
    checks.append(
        ReadinessCheck(
            "lean toolchain",
            tc_dir.is_dir(),
            f"{toolchain} at {tc_dir}" if tc_dir.is_dir() else f"{toolchain} is not installed ({tc_dir} missing)",
            f"elan toolchain install {toolchain}",
        )
    )

    lakefile = next((p for p in (project / "lakefile.toml", project / "lakefile.lean") if p.exists()), None)
    project_ok = lakefile is not None and pinned == LEAN_TOOLCHAIN
    detail = (
        f"{project} (lakefile {lakefile.name}, toolchain {pinned})"
        if lakefile
        else f"{project} has no lakefile"
    )
    if lakefile and pinned != LEAN_TOOLCHAIN:
        detail += f"; expected toolchain {LEAN_TOOLCHAIN}"
    checks.append(ReadinessCheck("lean project", project_ok, detail, f"restore lean_project/ from the repository ({project})"))

    olean = project / MATHLIB_OLEAN_REL
    checks.append(
        ReadinessCheck(
            "mathlib cache",
            olean.exists(),
            f"{olean}" if olean.exists() else f"Mathlib build not found ({olean} missing)",
            f"cd {project} && lake exe cache get",
        )
    )

    repl = repl_binary(project)
    checks.append(
        ReadinessCheck(
            "repl binary",
            repl.exists() and os.access(repl, os.X_OK),
            str(repl) if repl.exists() else f"{repl} not built",
            f"cd {project} && lake build repl",
        )
    )

    has_dojo = importlib.util.find_spec("lean_dojo") is not None
    checks.append(
        ReadinessCheck(
            "lean_dojo (optional)",
            has_dojo,
            "importable" if has_dojo else "not installed (only the LeanDojo backend needs it)",
            "pip install -e '.[lean]'",
            required=False,
        )
    )
    checks.append(sandbox_check())
    return checks


def sandbox_check() -> ReadinessCheck:
    """Whether Lean processes run in the bubblewrap sandbox (`prover.lean.sandbox`).

    Required only in `require` mode; in `auto` mode an inactive sandbox is reported (Lean
    then runs unsandboxed, with a warning) but does not make Lean unusable.
    """
    from prover.lean.sandbox import INSTALL_HINT, sandbox_status

    try:
        status = sandbox_status()
    except ValueError as e:  # a bad $DCO_LEAN_SANDBOX
        return ReadinessCheck("Lean sandbox", False, str(e), "set DCO_LEAN_SANDBOX to auto, require or off")
    detail = ("active: " if status.active else "INACTIVE: ") + status.detail + f" (mode {status.mode})"
    fix = "" if status.active else (INSTALL_HINT if status.mode != "off" else "unset DCO_LEAN_SANDBOX to sandbox Lean")
    return ReadinessCheck("Lean sandbox", status.active, detail, fix, required=status.mode == "require")


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
