"""What every search strategy shares: stepping, stopping, verifying and the result record.

A search is a step machine: `step()` does one unit of work (one best-first expansion, one
round of sampling passes) and returns `None` while the search goes on, or its final
`Status`. Union ensembles interleave the steps of their members; single searches call
`run()`.

Rules of the final status:
- `PROVED` only after `env.verify` accepted the proof. The first verified proof ends the
  search, whatever the budget says afterwards (a proof found within the budget is never
  reported unproved).
- A proof rejected by verification does not end the search: the edge that claimed it is
  treated as failed and the search goes on. If the search then ends without a verified
  proof, the status is `FAILED` (the record's contract), with the first rejected proof in
  `proof`, `verified=False`, and the reason in `verification_message`; the stopping
  reason is in the error log.
- Otherwise the reason the search stopped: `FAILED` (space exhausted), `BUDGET_EXHAUSTED`
  (expansions/passes used), `TIMEOUT` (deadline), `CANCELLED` (cancel event, or another
  union member proved the theorem).
"""

from __future__ import annotations

from typing import Sequence

from search.proposer import MixtureProposer, SingleProposer
from search.result import SearchResult, Status
from search.runtime import SearchContext, StopSearch


def credited_member(proof_members: Sequence[str]) -> str | None:
    """The member that contributed most steps to a proof; among equals, the one that
    contributed the latest step (so the member that closed the proof wins a tie)."""
    if not proof_members:
        return None
    counts: dict[str, int] = {}
    for member in proof_members:
        counts[member] = counts.get(member, 0) + 1
    most = max(counts.values())
    for member in reversed(proof_members):
        if counts[member] == most:
            return member
    raise AssertionError("unreachable")


class SearchEngine:
    """Base of the strategies. Subclasses implement `_step` and `_progress_payload`."""

    strategy = "abstract"

    def __init__(self, ctx: SearchContext, proposer: SingleProposer | MixtureProposer) -> None:
        self.ctx = ctx
        self.proposer = proposer
        self.status: Status | None = None
        self.expansions = 0
        self.passes = 0
        self.proof: list[str] | None = None
        self.proof_members: list[str] | None = None
        self.verification_message = ""
        self._rejected: tuple[list[str], list[str], str] | None = None

    # -- stepping ---------------------------------------------------------------------

    def _step(self) -> Status | None:
        raise NotImplementedError

    def step(self) -> Status | None:
        """One unit of work; the final status once the search has ended (idempotent then)."""
        if self.status is not None:
            return self.status
        try:
            status = self._step()
        except StopSearch as stop:
            status = stop.status
        if status is not None:
            self._end(status)
        return self.status

    def stop(self, status: Status) -> None:
        """End the search from outside (union: another member proved the theorem)."""
        if self.status is None:
            self._end(status)

    def _end(self, status: Status) -> None:
        if status is not Status.PROVED and self._rejected is not None:
            self.ctx.errors.record("stopped", f"search ended ({status.value}) after a rejected proof")
            self.proof, self.proof_members, self.verification_message = self._rejected
            status = Status.FAILED
        self.status = status

    def run(self) -> SearchResult:
        while self.step() is None:
            pass
        return self.result()

    # -- proofs -----------------------------------------------------------------------

    def found(self, tactics: list[str], members: list[str]) -> bool:
        """A path claims to close every goal: verify it. True ends the search (PROVED)."""
        verification = self.ctx.verify(tactics)
        if verification.ok:
            self.proof = tactics
            self.proof_members = members
            self.verification_message = verification.message
            return True
        if self._rejected is None:
            self._rejected = (tactics, members, verification.message)
        return False

    def report_progress(self) -> None:
        if self.ctx.progress is not None:
            self.ctx.report(self._progress_payload())

    def _progress_payload(self) -> dict:
        raise NotImplementedError

    # -- result -----------------------------------------------------------------------

    def result(self) -> SearchResult:
        if self.status is None:
            raise RuntimeError("result() of a search that has not ended")
        proved = self.status is Status.PROVED
        if self.proof_members:
            member = credited_member(self.proof_members)
        else:
            member = self.proposer.name if isinstance(self.proposer, SingleProposer) else None
        result = SearchResult(
            theorem_id=self.ctx.theorem.id,
            status=self.status,
            strategy=self.strategy,
            proof=list(self.proof) if self.proof is not None else None,
            verified=proved,
            verification_message=self.verification_message,
            member=member,
            passes=self.passes,
            expansions=self.expansions,
            proof_members=list(self.proof_members) if self.proof_members is not None else None,
        )
        return self.ctx.fill(result)
