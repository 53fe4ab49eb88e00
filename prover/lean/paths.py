"""Where the Lean project, toolchain and REPL binary live, and the pinned versions.

The Lake project is `lean_project/` at the repository root unless `DCO_LEAN_PROJECT` names
another directory. The REPL is a Lake dependency (`require REPL`), so its binary is built
inside the dependency's own build directory.
"""

from __future__ import annotations

import os
from pathlib import Path

LEAN_TOOLCHAIN = "leanprover/lean4:v4.24.0"
MATHLIB_REV = "v4.24.0"
REPL_REV = "v4.24.0"

REPO_ROOT = Path(__file__).resolve().parents[2]

# Relative to the Lake project; the REPL package is named `REPL` in its lakefile.
REPL_BINARY_REL = Path(".lake/packages/REPL/.lake/build/bin/repl")
MATHLIB_OLEAN_REL = Path(".lake/packages/mathlib/.lake/build/lib/lean/Mathlib.olean")


def lean_project_dir() -> Path:
    """The Lake project the REPL runs in (`DCO_LEAN_PROJECT` or `<repo>/lean_project`)."""
    override = os.environ.get("DCO_LEAN_PROJECT")
    return Path(override).expanduser().resolve() if override else REPO_ROOT / "lean_project"


def elan_home() -> Path:
    return Path(os.environ.get("ELAN_HOME", Path.home() / ".elan"))


def toolchain_dir_name(toolchain: str = LEAN_TOOLCHAIN) -> str:
    """elan's directory name for a toolchain: `leanprover/lean4:v4.24.0` -> `leanprover--lean4---v4.24.0`."""
    return toolchain.replace("/", "--").replace(":", "---")


def repl_binary(project: Path | None = None) -> Path:
    return (project or lean_project_dir()) / REPL_BINARY_REL


def default_repl_command(project: Path | None = None) -> tuple[str, ...]:
    """`lake env <repl>`: Lake puts the project's packages (Mathlib) on `LEAN_PATH`."""
    return ("lake", "env", str(repl_binary(project)))
