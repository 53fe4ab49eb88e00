"""`DojoEnvironment`: the search's `ProofEnvironment` on LeanDojo (`lean_dojo`, optional).

For theorems of traced repositories (LeanDojo Benchmark 4 / Mathlib): `Theorem.metadata`
carries `url`, `commit`, `file_path` and optionally `full_name` (default `Theorem.id`).

Mapping of `Dojo.run_tac` results: `TacticState` -> `Progress` (pp = `TacticState.pp`),
`ProofFinished` -> `Proved`, `LeanError` -> `Failed(LEAN_ERROR)`, `ProofGivenUp` ->
`Failed(GIVEN_UP)`; `DojoTacticTimeoutError` -> `Failed(TIMEOUT)` and `DojoCrashError` ->
`Failed(CRASH)` (out-of-memory named), after both of which the Dojo is closed and reopened
(a timed-out Dojo stays broken). Handles carry the Dojo's generation; a state of a closed
Dojo is rebuilt by replaying its tactic path in the new Dojo (or `Failed(CRASH)` if that
is disabled or fails).

Tactics are screened by `prover.lean.untrusted` exactly as the REPL backend screens them
(`check_tactic` in `apply`, `screen_tactics` in `verify`), and what is sent is the screened
text (comments blanked).

`verify` runs the same check as the REPL backend: a command-mode Dojo at the theorem's line
of its file (`Dojo((repo, file_path, line))`, the environment just before the theorem)
elaborates the theorem under a fresh name with the proof (`verification_command`), then
`#print axioms <fresh>`, whose answer goes through the shared `audit_axioms`. It needs
`metadata["start"]` and the statement: `Theorem.statement` / `metadata["statement"]`
(screened like any untrusted statement) or, for benchmark theorems, the declaration's text
in LeanDojo's traced copy of the file up to the proof's `:=` (`statement_from_source`).
Without them it fails: an unaudited proof is never reported verified.

A Dojo whose `__enter__` fails leaves LeanDojo's Lean process and modified temp file
behind; `_enter_context` kills the process tree and removes the file.

`DISABLE_REMOTE_CACHE` is set (unless `offline=False`) *before* `lean_dojo` is imported:
LeanDojo reads it at import time, and without it the remote-cache probe fails offline.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import psutil

from prover.lean.untrusted import (
    UntrustedInputError,
    check_statement,
    check_tactic,
    screen_tactics,
    split_statement,
    statement_from_source,
)
from prover.lean.verification import audit_axioms, fresh_name, verification_command
from search.types import (
    EnvironmentStartError,
    Failed,
    FailureKind,
    ProofState,
    Progress,
    Proved,
    TacticResult,
    Theorem,
    Verification,
)

__all__ = ["DojoEnvironment", "DojoApi", "DojoHandle", "LeanDojoUnavailable", "load_lean_dojo"]

_SORRY_WARNING = re.compile(r"declaration uses ['`]sorry['`]")
# `file:line:col: info: ` in front of a message printed by `lean` (dropped before the audit).
_MESSAGE_PREFIX = re.compile(r"^\S*:\d+:\d+:\s*(?:info|information):\s*")


class LeanDojoUnavailable(ImportError):
    """`lean_dojo` is not installed."""


@dataclass(frozen=True)
class DojoApi:
    """The parts of `lean_dojo` this module uses (injectable for tests)."""

    Dojo: Any
    Theorem: Any
    LeanGitRepo: Any
    TacticState: Any
    ProofFinished: Any
    LeanError: Any
    ProofGivenUp: Any
    DojoInitError: Any
    DojoTacticTimeoutError: Any
    DojoCrashError: Any
    check_proof: Any
    CommandState: Any = None
    read_source: Any = None  # (url, commit, file_path) -> the traced file's text, or None


def load_lean_dojo(offline: bool = True) -> DojoApi:
    """Imports `lean_dojo`; raises `LeanDojoUnavailable` with the install hint."""
    if offline:
        os.environ.setdefault("DISABLE_REMOTE_CACHE", "1")
    try:
        import lean_dojo as ld  # type: ignore[import-not-found]
    except ImportError as e:
        raise LeanDojoUnavailable(
            "the LeanDojo backend needs `lean_dojo`: pip install -e '.[lean]' "
            "(and Lean/lake on PATH, git >= 2.25, a traced repository in CACHE_DIR)"
        ) from e
    return DojoApi(
        Dojo=ld.Dojo,
        Theorem=ld.Theorem,
        LeanGitRepo=ld.LeanGitRepo,
        TacticState=ld.TacticState,
        ProofFinished=ld.ProofFinished,
        LeanError=ld.LeanError,
        ProofGivenUp=ld.ProofGivenUp,
        DojoInitError=ld.DojoInitError,
        DojoTacticTimeoutError=ld.DojoTacticTimeoutError,
        DojoCrashError=ld.DojoCrashError,
        check_proof=ld.check_proof,
        CommandState=getattr(ld, "CommandState", None),
        read_source=_traced_source_reader(ld),
    )


def _traced_source_reader(ld: Any) -> Any:
    """Reads a theorem's file from LeanDojo's traced copy of its repository (None if absent)."""

    def read(url: str, commit: str, file_path: str) -> str | None:
        try:
            from lean_dojo.data_extraction.trace import get_traced_repo_path  # type: ignore[import-not-found]

            root = Path(get_traced_repo_path(ld.LeanGitRepo(url, commit)))
            return (root / file_path).read_text(encoding="utf-8")
        except Exception:  # noqa: BLE001 - no traced copy: the statement stays unknown
            return None

    return read


TheoremKey = tuple[str, str, str, str]


@dataclass(frozen=True)
class DojoHandle:
    key: TheoremKey
    generation: int
    state: Any  # a lean_dojo TacticState
    path: tuple[str, ...] = ()


class _Open:
    __slots__ = ("context", "dojo", "init_state", "generation")

    def __init__(self, context: Any, dojo: Any, init_state: Any, generation: int) -> None:
        self.context, self.dojo, self.init_state, self.generation = context, dojo, init_state, generation


class DojoEnvironment:
    """LeanDojo backend; keeps at most `max_open` Dojos (Lean processes) open, LRU-closed.

    `timeout_s` is the Dojo's per-interaction limit in seconds; a per-call `timeout_s` of
    `apply` is applied to the Dojo's pexpect process when it exposes one.
    """

    def __init__(
        self,
        *,
        timeout_s: int = 600,
        max_open: int = 1,
        offline: bool = True,
        rebuild_stale_states: bool = True,
        additional_imports: Sequence[str] = (),
        api: DojoApi | None = None,
    ) -> None:
        self.api = api or load_lean_dojo(offline)
        self.timeout_s = timeout_s
        self.max_open = max(1, max_open)
        self.rebuild_stale_states = rebuild_stale_states
        self.additional_imports = list(additional_imports)
        self._open: OrderedDict[TheoremKey, _Open] = OrderedDict()
        self._theorems: dict[TheoremKey, Any] = {}
        self._generation = 0
        self.restarts = 0

    # --- ProofEnvironment ------------------------------------------------------------------

    def start(self, theorem: Theorem) -> ProofState:
        key, dojo_theorem = self._dojo_theorem(theorem)
        entry = self._open.get(key)
        if entry is None:
            entry = self._enter(key, dojo_theorem)
        self._open.move_to_end(key)
        return ProofState(entry.init_state.pp, DojoHandle(key, entry.generation, entry.init_state))

    def apply(self, state: ProofState, tactic: str, timeout_s: float | None = None) -> TacticResult:
        h = state.handle
        if not isinstance(h, DojoHandle):
            return Failed(FailureKind.CRASH, f"state handle {type(h).__name__} does not come from a DojoEnvironment")
        try:
            tactic = check_tactic(tactic).text
        except UntrustedInputError as e:
            return Failed(FailureKind.LEAN_ERROR, f"rejected before Lean: {e}")
        entry = self._open.get(h.key)
        dojo_state = h.state
        if entry is None or entry.generation != h.generation:
            if not self.rebuild_stale_states:
                return Failed(FailureKind.CRASH, "stale proof state: its Dojo was restarted or closed")
            try:
                entry, dojo_state = self._rebuild(h, state.pp)
            except Exception as e:  # noqa: BLE001 - any failure to rebuild is a crash of this state
                return Failed(FailureKind.CRASH, f"stale proof state could not be rebuilt: {e}")
        self._open.move_to_end(h.key)
        return self._run(entry, h.key, dojo_state, h.path, tactic, timeout_s)

    def verify(self, theorem: Theorem, tactics: Sequence[str]) -> Verification:
        if not tactics:
            return Verification(False, "no tactics to check")
        try:
            texts = screen_tactics(tactics)
        except UntrustedInputError as e:
            return Verification(False, f"rejected before Lean: {e}")
        try:
            key, dojo_theorem = self._dojo_theorem(theorem)
        except EnvironmentStartError as e:
            return Verification(False, str(e))
        statement_text = theorem.statement or str(theorem.metadata.get("statement") or "")
        start = theorem.metadata.get("start")
        if not start:
            return Verification(False, "LeanDojo verification needs the theorem's `start` position (a traced repository); not verified")
        trusted = False
        if not statement_text.strip() and self.api.read_source is not None:
            # The traced file is trusted (the benchmark's repository): its declaration's
            # statement, up to the proof's `:=`.
            source = self.api.read_source(key[0], key[1], key[2])
            statement_text = (statement_from_source(source, int(start[0]), int(start[1]) if len(start) > 1 else 1) or "") if source else ""
            trusted = True
        if not statement_text.strip():
            return Verification(
                False, "LeanDojo verification needs the theorem's statement (Theorem.statement, metadata `statement`, "
                "or the traced file) to audit its axioms; not verified"
            )
        try:
            statement = split_statement(statement_text) if trusted else check_statement(statement_text)
            check = verification_command(statement, texts, fresh_name())
        except (UntrustedInputError, ValueError) as e:
            return Verification(False, f"statement cannot be re-checked: {e}")
        repo = getattr(dojo_theorem, "repo", None) or self.api.LeanGitRepo(key[0], key[1])
        context = self.api.Dojo((repo, Path(key[2]), int(start[0])), timeout=self.timeout_s, additional_imports=self.additional_imports)
        try:
            dojo, state = self._enter_context(context)
        except Exception as e:  # noqa: BLE001 - any start failure is a verification failure
            return Verification(False, f"LeanDojo could not open {key[2]} for re-checking: {type(e).__name__}: {e}")
        try:
            return self._verify_in(dojo, state, check)
        except Exception as e:  # noqa: BLE001 - timeouts, crashes, protocol errors: never verified
            return Verification(False, f"LeanDojo failed while re-checking: {type(e).__name__}: {e}")
        finally:
            self._exit_context(context)

    def _verify_in(self, dojo: Any, state: Any, check: Any) -> Verification:
        name = check.query
        r = dojo.run_cmd(state, check.text)
        if isinstance(r, self.api.LeanError):
            return Verification(False, "Lean reported errors: " + str(r.error)[:2000])
        if _SORRY_WARNING.search(str(getattr(r, "message", "") or "")):
            return Verification(False, "the proof uses `sorry`")
        a = dojo.run_cmd(r, f"#print axioms {name}")
        if isinstance(a, self.api.LeanError):
            return Verification(False, f"`#print axioms {name}` failed: {a.error}")
        lines = [_MESSAGE_PREFIX.sub("", m).strip() for m in str(getattr(a, "message", "") or "").strip().split("\n\n") if m.strip()]
        audit = audit_axioms(lines, check.fresh)
        if not audit.ok:
            return Verification(False, audit.message)
        return Verification(True, "verified through LeanDojo; " + audit.message)

    def close(self) -> None:
        while self._open:
            _, entry = self._open.popitem(last=False)
            self._exit(entry)

    def __enter__(self) -> "DojoEnvironment":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals -------------------------------------------------------------------------

    def _dojo_theorem(self, theorem: Theorem) -> tuple[TheoremKey, Any]:
        md = theorem.metadata
        missing = [k for k in ("url", "commit", "file_path") if not md.get(k)]
        if missing:
            raise EnvironmentStartError(
                f"theorem {theorem.id}: LeanDojo needs metadata {', '.join(missing)} (a traced repository)"
            )
        full_name = md.get("full_name") or theorem.id
        key = (str(md["url"]), str(md["commit"]), str(md["file_path"]), str(full_name))
        if key not in self._theorems:
            repo = self.api.LeanGitRepo(key[0], key[1])
            self._theorems[key] = self.api.Theorem(repo, Path(key[2]), key[3])
        return key, self._theorems[key]

    def _enter(self, key: TheoremKey, dojo_theorem: Any) -> _Open:
        while len(self._open) >= self.max_open:
            _, old = self._open.popitem(last=False)
            self._exit(old)
        context = self.api.Dojo(dojo_theorem, timeout=self.timeout_s, additional_imports=self.additional_imports)
        try:
            dojo, init_state = self._enter_context(context)
        except self.api.DojoInitError as e:
            raise EnvironmentStartError(f"LeanDojo could not open {key[3]} ({key[2]}): {e}") from e
        except Exception as e:  # noqa: BLE001 - tracing/lake failures surface as start errors
            raise EnvironmentStartError(f"LeanDojo failed to start for {key[3]}: {type(e).__name__}: {e}") from e
        if not isinstance(init_state, self.api.TacticState):
            context.__exit__(None, None, None)
            raise EnvironmentStartError(f"LeanDojo opened {key[3]} without a tactic state")
        self._generation += 1
        entry = _Open(context, dojo, init_state, self._generation)
        self._open[key] = entry
        return entry

    @staticmethod
    def _exit(entry: _Open) -> None:
        DojoEnvironment._exit_context(entry.context)

    @staticmethod
    def _exit_context(context: Any) -> None:
        try:
            context.__exit__(None, None, None)
        except Exception:  # noqa: BLE001 - a broken Dojo may fail to clean up; it is gone anyway
            pass

    @staticmethod
    def _enter_context(context: Any) -> Any:
        """`context.__enter__()`; on failure kills what LeanDojo started (its `proc`, a
        pexpect child, and that child's descendants) and removes its `modified_file`, which
        `Dojo.__exit__` would have done but is never called for a failed `__enter__`."""
        try:
            return context.__enter__()
        except BaseException:
            _cleanup_failed_dojo(context)
            raise

    def _restart(self, key: TheoremKey) -> None:
        entry = self._open.pop(key, None)
        if entry is not None:
            self._exit(entry)
        self.restarts += 1
        try:
            self._enter(key, self._theorems[key])
        except EnvironmentStartError:
            pass  # the next start/apply reports it

    def _rebuild(self, h: DojoHandle, expected_pp: str) -> tuple[_Open, Any]:
        entry = self._open.get(h.key)
        if entry is None:
            entry = self._enter(h.key, self._theorems[h.key])
        state = entry.init_state
        for i, tactic in enumerate(h.path, 1):
            r = entry.dojo.run_tac(state, tactic)
            if not isinstance(r, self.api.TacticState):
                raise RuntimeError(f"replaying tactic {i} of {len(h.path)} gave {type(r).__name__}")
            state = r
        if state.pp != expected_pp:
            raise RuntimeError("the replayed path reached different goals")
        return entry, state

    def _run(
        self, entry: _Open, key: TheoremKey, dojo_state: Any, path: tuple[str, ...], tactic: str, timeout_s: float | None
    ) -> TacticResult:
        proc = getattr(entry.dojo, "proc", None)
        if timeout_s is not None and proc is not None and hasattr(proc, "timeout"):
            proc.timeout = timeout_s
        try:
            r = entry.dojo.run_tac(dojo_state, tactic)
        except self.api.DojoTacticTimeoutError:
            self._restart(key)
            return Failed(FailureKind.TIMEOUT, "tactic timed out; the Dojo was restarted")
        except self.api.DojoCrashError as e:
            oom = bool(getattr(e, "is_out_of_memory", False))
            self._restart(key)
            return Failed(FailureKind.CRASH, "Lean ran out of memory" if oom else f"Dojo crashed: {e}")
        finally:
            if timeout_s is not None and proc is not None and hasattr(proc, "timeout"):
                proc.timeout = self.timeout_s
        if isinstance(r, self.api.TacticState):
            return Progress(ProofState(r.pp, DojoHandle(key, entry.generation, r, path + (tactic,))))
        if isinstance(r, self.api.ProofFinished):
            return Proved()
        if isinstance(r, self.api.ProofGivenUp):
            return Failed(FailureKind.GIVEN_UP, "the proof contains `sorry`")
        if isinstance(r, self.api.LeanError):
            return Failed(FailureKind.LEAN_ERROR, str(r.error))
        return Failed(FailureKind.CRASH, f"unexpected LeanDojo result {type(r).__name__}")


def _cleanup_failed_dojo(context: Any) -> None:
    proc = getattr(context, "proc", None)
    pid = getattr(proc, "pid", None)
    if isinstance(pid, int) and pid > 0:
        try:
            root = psutil.Process(pid)
            victims = root.children(recursive=True) + [root]
        except psutil.Error:
            victims = []
        for p in victims:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(victims, timeout=5)
        for closer in ("close", "wait"):
            try:
                fn = getattr(proc, closer, None)
                if callable(fn):
                    fn(force=True) if closer == "close" else fn()
            except Exception:  # noqa: BLE001 - best effort: the process is already killed
                pass
    f = getattr(context, "modified_file", None)
    if f is not None:
        path = getattr(f, "name", None)
        try:
            f.close()
        except Exception:  # noqa: BLE001
            pass
        if isinstance(path, str):
            try:
                os.unlink(path)
            except OSError:
                pass
