"""OS sandbox for Lean processes (defence in depth behind `prover.lean.untrusted`).

Each Lean REPL process runs under bubblewrap (`bwrap`, Debian package `bubblewrap`) when
the machine allows it:

- `--unshare-net`: a private network namespace with only a down loopback: nothing, not even
  127.0.0.1 (the service's own port), is reachable;
- `--unshare-pid --die-with-parent`: its own PID namespace, killed when its parent dies;
- `--cap-drop ALL`: no capabilities even when the service runs as root (else the child
  could remount the read-only root read-write);
- `--ro-bind / /`: the whole file system read-only (Lean needs its toolchain, the Lake
  project and Mathlib's .olean files), with `--tmpfs /run` and `--tmpfs /tmp` over the
  places that hold other programs' UNIX sockets and scratch files (a socket under a
  read-only bind would stay connectable), themselves remounted read-only, and a fresh
  `/dev` and `/proc`;
- writable: only the process's own scratch directory (its `TMPDIR`) and the directories
  listed in `ReplConfig.sandbox_writable` (e.g. the header-pickle directory).

Modes (`ReplConfig.sandbox`, or the environment variable `DCO_LEAN_SANDBOX`): `auto` (the
default: sandbox when `bwrap` works here, otherwise run unsandboxed with a warning),
`require` (refuse to start Lean without the sandbox), `off`.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

__all__ = ["SANDBOX_MODES", "SandboxStatus", "SandboxUnavailable", "resolve_mode", "sandbox_status", "wrap_command"]

log = logging.getLogger(__name__)

SANDBOX_MODES = ("auto", "require", "off")
INSTALL_HINT = "install bubblewrap (`apt-get install -y bubblewrap`; `dco-prover setup-lean` does it where it can)"


# Directories replaced by an empty read-only tmpfs: other programs' sockets and scratch files.
_MASKED = ("/run", "/tmp")


class SandboxUnavailable(RuntimeError):
    """`require` mode, and bubblewrap is missing or does not work on this machine."""


@dataclass(frozen=True)
class SandboxStatus:
    """Whether Lean processes started now would be sandboxed. `detail` says why (not)."""

    mode: str
    active: bool
    bwrap: str | None
    detail: str


def resolve_mode(mode: str | None = None) -> str:
    """The effective mode: `mode`, else `$DCO_LEAN_SANDBOX`, else `auto`; validated."""
    value = (mode or os.environ.get("DCO_LEAN_SANDBOX") or "auto").strip().lower()
    if value not in SANDBOX_MODES:
        raise ValueError(f"sandbox mode must be one of {', '.join(SANDBOX_MODES)}, got {value!r}")
    return value


def _bwrap_args(scratch: Path, writable: Sequence[Path], cwd: Path | None) -> list[str]:
    args = [
        # No capabilities: run by root, bwrap would otherwise leave them all, and the child
        # could simply remount `/` read-write.
        "--cap-drop", "ALL",
        "--die-with-parent", "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
        "--ro-bind", "/", "/",
        "--dev", "/dev",
        "--proc", "/proc",
        # Kernel knobs stay read-only even for a root-owned child (bwrap's own cover of
        # these is not applied on every kernel).
        "--ro-bind-try", "/proc/sys", "/proc/sys",
        "--ro-bind-try", "/proc/sysrq-trigger", "/proc/sysrq-trigger",
        *[x for layer in _MASKED for x in ("--tmpfs", layer)],
    ]
    if cwd is not None:
        c = Path(cwd).resolve()
        # A working directory under a masked layer stays visible (read-only); anywhere else
        # the root bind already shows it (re-binding `/` would undo the masks).
        if any(c != Path(layer) and Path(layer) in c.parents for layer in _MASKED):
            args += ["--ro-bind", str(c), str(c)]
    for path in [scratch, *writable]:
        p = str(Path(path).resolve())
        args += ["--bind", p, p]
    # The tmpfs layers are read-only too (the binds above stay writable): nothing but the
    # scratch dir and `writable` can be written, not even ephemerally.
    bound = {str(Path(p).resolve()) for p in [scratch, *writable]}
    for layer in _MASKED:
        if layer not in bound:  # a writable bind of the layer itself replaced the tmpfs
            args += ["--remount-ro", layer]
    args += ["--setenv", "TMPDIR", str(Path(scratch).resolve())]
    if cwd is not None:
        args += ["--chdir", str(Path(cwd).resolve())]
    return args


@functools.lru_cache(maxsize=4)
def _probe(bwrap: str) -> str | None:
    """None when a trivial sandboxed command runs here; else why not (user namespaces off, ...)."""
    probe_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    true = shutil.which("true") or "/bin/true"
    try:
        r = subprocess.run(
            [bwrap, *_bwrap_args(probe_dir, (), None), "--", true],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bwrap could not run: {e}"
    if r.returncode != 0:
        return f"bwrap fails here (exit {r.returncode}): {r.stderr.decode(errors='replace').strip()[:300]}"
    return None


def sandbox_status(mode: str | None = None) -> SandboxStatus:
    """What `wrap_command` would do now (for `doctor` and `/readyz`)."""
    mode = resolve_mode(mode)
    bwrap = shutil.which("bwrap")
    if mode == "off":
        return SandboxStatus(mode, False, bwrap, "sandbox disabled (mode off): Lean runs with this user's rights")
    if bwrap is None:
        return SandboxStatus(mode, False, None, f"bubblewrap (bwrap) is not installed: {INSTALL_HINT}")
    problem = _probe(bwrap)
    if problem is not None:
        return SandboxStatus(mode, False, bwrap, problem)
    return SandboxStatus(mode, True, bwrap, "bubblewrap: no network, read-only file system except its scratch dir, own PID namespace")


_warned = False


def wrap_command(
    command: Sequence[str], *, scratch: Path, writable: Sequence[Path] = (), cwd: Path | None = None, mode: str | None = None
) -> tuple[list[str], bool]:
    """`(argv, sandboxed)`: `command` run under bubblewrap when the mode and machine allow.

    Raises `SandboxUnavailable` in `require` mode when the sandbox cannot run. In `auto`
    mode without a working bwrap, returns `command` unchanged and logs a warning (once).
    """
    status = sandbox_status(mode)
    if status.active:
        assert status.bwrap is not None
        return [status.bwrap, *_bwrap_args(scratch, writable, cwd), "--", *command], True
    if status.mode == "require":
        raise SandboxUnavailable(f"the Lean sandbox is required but unavailable: {status.detail}")
    if status.mode == "auto":
        global _warned
        if not _warned:
            log.warning("Lean runs UNSANDBOXED (network and file system reachable): %s", status.detail)
            _warned = True
    return list(command), False
