"""`ReplEnvironment`: the search's `ProofEnvironment` on the Lean REPL.

- `start(theorem)`: screens statement and header (unless `check_input=False`), leases a
  process for the header's imports, elaborates `<statement> := by sorry` on the header
  environment and takes that sorry's proof state as the root (pp = its goal).
- `apply(state, tactic)`: `{"tactic", "proofState"}` in the process holding the state;
  `proofStatus` decides: "Completed" -> `Proved`; open goals -> `Progress` (pp = goals
  joined by blank lines); error messages, `{"message"}` errors, kernel errors ("Error: ..."),
  leftover metavariables -> `LEAN_ERROR`; a sorry -> `GIVEN_UP`; wall-clock limit ->
  `TIMEOUT` (the process group is killed and restarted on next use); crash or garbage ->
  `CRASH`.
- Handles carry the pool slot and process generation. A state whose process died or was
  recycled is *stale*: with `rebuild_stale_states` it is rebuilt by replaying its tactic
  path from the root in a live process (checked to reproduce the same goals); otherwise,
  or if rebuilding fails, the result is `Failed(CRASH)` - never an answer about another
  process's state with the same id.
- `verify(theorem, tactics)`: the screened tactics (`screen_tactics`, the one screen every
  backend uses) in one command on the header environment: the theorem renamed to a fresh
  name only the verifier knows (`prover.lean.verification`); accepted only with no error
  message, no sorry (neither reported nor warned), and an axiom audit (`audit_axioms`) of
  `#print axioms <fresh>` whose report names that fresh constant and lists only
  `ALLOWED_AXIOMS`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

from prover.lean.pool import PoolBusy, PoolClosed, ReplPool, SlotGone
from prover.lean.process import HeaderError, ReplConfig, ReplCrashed, ReplError, ReplProcess, ReplProtocolError, ReplTimeout
from prover.lean.protocol import (
    PROOF_COMPLETED,
    PROOF_CONTAINS_MVARS,
    PROOF_CONTAINS_SORRY,
    PROOF_OPEN_GOALS,
    ErrorResponse,
    TacticResponse,
)
from prover.lean.untrusted import (
    DEFAULT_ALLOWED_IMPORT_ROOTS,
    CheckedHeader,
    CheckedStatement,
    UntrustedInputError,
    check_header,
    check_statement,
    check_tactic,
    parse_header,
    screen_tactics,
    split_statement,
)
from prover.lean.verification import (
    ALLOWED_AXIOMS,
    VerificationCommand,
    audit_axioms,
    fresh_name,
    parse_axioms,
    verification_command,
)
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

__all__ = ["ReplEnvironment", "ReplHandle", "ALLOWED_AXIOMS", "classify_tactic_response", "parse_axioms", "proof_command"]

_SORRY_WARNING = re.compile(r"declaration uses ['`]sorry['`]")


@dataclass(frozen=True)
class _Origin:
    """What rebuilds a theorem's root: the header and the `:= by sorry` command."""

    header: str
    header_body: str
    sorry_command: str


@dataclass(frozen=True)
class ReplHandle:
    """Where a proof state lives: pool slot, process generation, REPL id, and how to rebuild it."""

    slot: int
    generation: int
    proof_state: int
    origin: _Origin
    path: tuple[str, ...] = ()


class _RebuildFailed(Exception):
    pass


def classify_tactic_response(
    resp: TacticResponse | ErrorResponse, make_state: Callable[[TacticResponse], ProofState]
) -> TacticResult:
    """Maps one REPL answer to a tactic onto the search's result types (see module doc)."""
    if isinstance(resp, ErrorResponse):
        if resp.message.startswith("Unknown proof state"):
            return Failed(FailureKind.CRASH, "the REPL does not know this proof state (its process lost it)")
        msg = resp.message
        return Failed(FailureKind.LEAN_ERROR, msg[len("Lean error:\n"):] if msg.startswith("Lean error:\n") else msg)
    if resp.errors:
        return Failed(FailureKind.LEAN_ERROR, "\n\n".join(m.data for m in resp.errors))
    status = resp.proof_status
    if resp.sorries or status == PROOF_CONTAINS_SORRY:
        return Failed(FailureKind.GIVEN_UP, "the tactic leaves a `sorry`")
    if status is not None and status.startswith("Error"):
        return Failed(FailureKind.LEAN_ERROR, status)
    if status == PROOF_COMPLETED and not resp.goals:
        return Proved()
    if status == PROOF_CONTAINS_MVARS:
        return Failed(FailureKind.LEAN_ERROR, "the proof term still contains metavariables")
    if resp.goals and status in (PROOF_OPEN_GOALS, None):
        return Progress(make_state(resp))
    return Failed(FailureKind.LEAN_ERROR, f"unexpected proof status {status!r} with {len(resp.goals)} goals")


def proof_command(statement: CheckedStatement, tactics: Sequence[str], name: str | None = None) -> tuple[str, str]:
    """`(command, fresh)`: the theorem under a fresh last name component (`verification_command`)."""
    fresh = name or fresh_name()
    return verification_command(statement, tactics, fresh).text, fresh


class ReplEnvironment:
    """The REPL backend. Thread-safe; pass a shared `pool` to share processes."""

    def __init__(
        self,
        config: ReplConfig | None = None,
        *,
        pool: ReplPool | None = None,
        max_processes: int | None = None,
        check_input: bool = True,
        rebuild_stale_states: bool = True,
        allowed_import_roots: Sequence[str] = DEFAULT_ALLOWED_IMPORT_ROOTS,
    ) -> None:
        self.config = pool.config if pool is not None else (config or ReplConfig())
        self._owns_pool = pool is None
        self.pool = pool or ReplPool(self.config, max_size=max_processes)
        self.check_input = check_input
        self.rebuild_stale_states = rebuild_stale_states
        self.allowed_import_roots = tuple(allowed_import_roots)

    # --- ProofEnvironment ------------------------------------------------------------------

    def start(self, theorem: Theorem) -> ProofState:
        statement, header = self._prepare(theorem)
        origin = _Origin(header.text, header.body, statement.text + " := by sorry")
        try:
            with self.pool.lease(origin.header) as lease:
                lease.process.recycle_if_needed()
                ps, pp = self._open_root(lease.process, origin)
                return ProofState(pp, ReplHandle(lease.slot, lease.process.generation, ps, origin))
        except (PoolBusy, PoolClosed) as e:
            raise EnvironmentStartError(f"theorem {theorem.id}: {e}") from e
        except EnvironmentStartError as e:
            raise EnvironmentStartError(f"theorem {theorem.id}: {e}") from e

    def apply(self, state: ProofState, tactic: str, timeout_s: float | None = None) -> TacticResult:
        h = state.handle
        if not isinstance(h, ReplHandle):
            return Failed(FailureKind.CRASH, f"state handle {type(h).__name__} does not come from a ReplEnvironment")
        if self.check_input:
            try:
                tactic = check_tactic(tactic).text
            except UntrustedInputError as e:
                return Failed(FailureKind.LEAN_ERROR, f"rejected before Lean: {e}")
        timeout = self.config.tactic_timeout_s if timeout_s is None else timeout_s
        try:
            with self.pool.lease_slot(h.slot) as lease:
                proc = lease.process
                if proc.alive and proc.generation == h.generation:
                    return self._run_tactic(lease.slot, proc, h, h.proof_state, tactic, timeout)
                reason = f"its REPL process was restarted (generation {h.generation} -> {proc.generation})"
        except SlotGone as e:
            reason = str(e)
        except PoolBusy as e:
            return Failed(FailureKind.TIMEOUT, f"waited too long for the REPL process: {e}")
        if not self.rebuild_stale_states:
            return Failed(FailureKind.CRASH, f"stale proof state: {reason}")
        try:
            with self.pool.lease(h.origin.header) as lease:
                try:
                    ps = self._rebuild(lease.process, h, state.pp, timeout)
                except (_RebuildFailed, ReplError) as e:
                    return Failed(FailureKind.CRASH, f"stale proof state ({reason}) could not be rebuilt: {e}")
                h2 = ReplHandle(lease.slot, lease.process.generation, ps, h.origin, h.path)
                return self._run_tactic(lease.slot, lease.process, h2, ps, tactic, timeout)
        except (PoolBusy, PoolClosed) as e:
            return Failed(FailureKind.CRASH, f"stale proof state ({reason}); no REPL process to rebuild it: {e}")

    def verify(self, theorem: Theorem, tactics: Sequence[str]) -> Verification:
        try:
            statement, header = self._prepare(theorem)
        except EnvironmentStartError as e:
            return Verification(False, str(e))
        if not tactics:
            return Verification(False, "no tactics to check")
        if self.check_input:
            try:
                texts = screen_tactics(tactics)
            except UntrustedInputError as e:
                return Verification(False, f"rejected before Lean: {e}")
        else:
            texts = list(tactics)
        check = verification_command(statement, texts, fresh_name())
        try:
            with self.pool.lease(header.text) as lease:
                return self._verify_in(lease.process, header, check)
        except (PoolBusy, PoolClosed) as e:
            return Verification(False, f"no REPL process available: {e}")

    def close(self) -> None:
        if self._owns_pool:
            self.pool.close()

    def __enter__(self) -> "ReplEnvironment":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals -------------------------------------------------------------------------

    def _prepare(self, theorem: Theorem) -> tuple[CheckedStatement, CheckedHeader]:
        if not theorem.statement.strip():
            raise EnvironmentStartError(f"theorem {theorem.id} has no statement; the REPL backend needs one")
        try:
            if self.check_input:
                return (
                    check_statement(theorem.statement),
                    check_header(theorem.header, allowed_import_roots=self.allowed_import_roots),
                )
            return split_statement(theorem.statement), parse_header(theorem.header)
        except UntrustedInputError as e:
            raise EnvironmentStartError(f"theorem {theorem.id} rejected: {e}") from e

    def _open_root(self, proc: ReplProcess, origin: _Origin) -> tuple[int, str]:
        try:
            env = proc.header_env(origin.header_body)
            resp = proc.run_command(origin.sorry_command, env, self.config.command_timeout_s)
        except HeaderError as e:
            raise EnvironmentStartError(f"header does not elaborate: {e}") from e
        except ReplError as e:
            raise EnvironmentStartError(f"REPL failed while opening the statement: {e}") from e
        if isinstance(resp, ErrorResponse):
            raise EnvironmentStartError(f"REPL refused the statement: {resp.message}")
        if resp.errors:
            raise EnvironmentStartError("statement does not elaborate: " + "; ".join(m.data for m in resp.errors))
        roots = [s for s in resp.sorries if s.proof_state is not None]
        if len(roots) != 1:
            raise EnvironmentStartError(f"expected exactly one `sorry` proof state, Lean reported {len(roots)}")
        return roots[0].proof_state, roots[0].goal  # type: ignore[return-value]

    def _run_tactic(
        self, slot: int, proc: ReplProcess, h: ReplHandle, ps: int, tactic: str, timeout: float
    ) -> TacticResult:
        try:
            resp = proc.run_tactic(tactic, ps, timeout)
        except ReplTimeout:
            return Failed(FailureKind.TIMEOUT, f"tactic ran past {timeout:g} s; the REPL process was killed and will restart")
        except (ReplCrashed, ReplProtocolError) as e:
            return Failed(FailureKind.CRASH, str(e))
        generation = proc.generation
        path = h.path + (tactic,)
        return classify_tactic_response(
            resp,
            lambda r: ProofState("\n\n".join(r.goals), ReplHandle(slot, generation, r.proof_state, h.origin, path)),
        )

    def _rebuild(self, proc: ReplProcess, h: ReplHandle, expected_pp: str, timeout: float) -> int:
        try:
            ps, pp = self._open_root(proc, h.origin)
        except EnvironmentStartError as e:
            raise _RebuildFailed(str(e)) from e
        for i, tactic in enumerate(h.path, 1):
            resp = proc.run_tactic(tactic, ps, timeout)
            if not isinstance(resp, TacticResponse) or resp.errors or resp.proof_status not in (PROOF_OPEN_GOALS, None):
                raise _RebuildFailed(f"replaying tactic {i} of {len(h.path)} did not reproduce an open state")
            ps, pp = resp.proof_state, "\n\n".join(resp.goals)
        if pp != expected_pp:
            raise _RebuildFailed("the replayed path reached different goals")
        return ps

    def _verify_in(self, proc: ReplProcess, header: CheckedHeader, check: VerificationCommand) -> Verification:
        command, name = check.text, check.query
        try:
            env = proc.header_env(header.body)
            resp = proc.run_command(command, env, self.config.verify_timeout_s)
        except HeaderError as e:
            return Verification(False, f"header does not elaborate: {e}")
        except ReplTimeout:
            return Verification(False, f"re-checking ran past {self.config.verify_timeout_s:g} s")
        except ReplError as e:
            return Verification(False, f"REPL failed while re-checking: {e}")
        if isinstance(resp, ErrorResponse):
            return Verification(False, f"REPL refused the proof: {resp.message}")
        if resp.errors:
            return Verification(False, "Lean reported errors: " + " | ".join(m.data for m in resp.errors)[:2000])
        if resp.sorries or any(_SORRY_WARNING.search(m.data) for m in resp.messages):
            return Verification(False, "the proof uses `sorry`")
        try:
            ax = proc.run_command(f"#print axioms {name}", resp.env, self.config.command_timeout_s)
        except ReplError as e:
            return Verification(False, f"REPL failed while printing axioms: {e}")
        if isinstance(ax, ErrorResponse) or ax.errors:
            detail = ax.message if isinstance(ax, ErrorResponse) else "; ".join(m.data for m in ax.errors)
            return Verification(False, f"`#print axioms {name}` failed: {detail}")
        audit = audit_axioms([m.data for m in ax.messages], check.fresh)
        if not audit.ok:
            return Verification(False, audit.message)
        return Verification(True, "verified; " + audit.message)
