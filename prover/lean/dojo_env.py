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

`verify` uses `lean_dojo.check_proof`, which recompiles the theorem's file with the proof:
it checks errors and `sorry` but cannot print axioms, so tactics naming `sorry`, `admit`
or `native_decide` are rejected up front and the message says axioms were not audited.

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

from prover.lean.untrusted import UntrustedInputError, check_tactic
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

_UNAUDITABLE = re.compile(r"(?<![A-Za-z0-9_.'])(sorry|admit|native_decide)(?![A-Za-z0-9_'!?])")


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
    )


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
        for i, t in enumerate(tactics, 1):
            try:
                check_tactic(t)
            except UntrustedInputError as e:
                return Verification(False, f"tactic {i} rejected: {e}")
            m = _UNAUDITABLE.search(t)
            if m:
                return Verification(False, f"tactic {i} uses `{m.group(1)}` (axioms cannot be audited through LeanDojo)")
        try:
            _, dojo_theorem = self._dojo_theorem(theorem)
        except EnvironmentStartError as e:
            return Verification(False, str(e))
        proof = "by\n" + "\n".join("  " + line for t in tactics for line in t.splitlines())
        try:
            ok = bool(self.api.check_proof(dojo_theorem, proof))
        except self.api.DojoInitError as e:
            return Verification(False, f"LeanDojo could not locate the theorem: {e}")
        except Exception as e:  # noqa: BLE001 - recompilation failures are verification failures
            return Verification(False, f"LeanDojo check_proof failed: {type(e).__name__}: {e}")
        if not ok:
            return Verification(False, "the recompiled file has errors or `sorry` in the proof")
        return Verification(True, "verified by recompiling the file (LeanDojo); axioms not audited")

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
            dojo, init_state = context.__enter__()
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
        try:
            entry.context.__exit__(None, None, None)
        except Exception:  # noqa: BLE001 - a broken Dojo may fail to clean up; it is gone anyway
            pass

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
