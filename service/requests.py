"""Turning an untrusted request into a normalised job request, or a 422 naming the problem.

A normalised request is what a worker runs and what the idempotency fingerprint covers:
    {"theorem": {"id", "statement", "header"}, "budget": {...every field...},
     "strategy": ..., "ensemble": ..., "members": [...] | None}
Statements, headers and the tactics of `/v1/check` go through `prover.lean.untrusted` (the Lean
backend's untrusted-input rules) before anything else looks at them, whatever the backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.backend import BackendPlan, TheoremCatalog
from service.config import ServiceConfig
from service.errors import ApiError
from service.schemas import BudgetIn, CheckRequest, ProofRequest


def _invalid(code: str, message: str) -> ApiError:
    return ApiError(422, code, message)


def resolve_theorem(
    statement: str | None, header: str | None, theorem_id: str | None, config: ServiceConfig, plan: BackendPlan, catalog: TheoremCatalog | None
) -> dict[str, str]:
    """The theorem a request names, as `{"id", "statement", "header"}`; `ApiError` 422 when it cannot be."""
    limits = config.limits
    if (statement is None) == (theorem_id is None):
        raise _invalid("theorem_required", "give exactly one of `statement` (a Lean declaration) or `theorem_id`")
    if theorem_id is not None:
        if header is not None:
            raise _invalid("header_without_statement", "`header` goes with `statement`; a `theorem_id` brings its own header")
        if catalog is None or len(catalog) == 0:
            raise _invalid("no_theorem_source", "this server has no theorem source for `theorem_id`; send a `statement`")
        try:
            theorem = catalog.resolve(theorem_id)
        except LookupError as err:
            raise _invalid("unknown_theorem", str(err)) from err
        return {"id": theorem.id, "statement": theorem.statement, "header": theorem.header}

    assert statement is not None
    if len(statement) > limits.max_statement_chars:
        raise _invalid("statement_too_long", f"statement has {len(statement)} characters; this server accepts at most {limits.max_statement_chars}")
    if header is not None and len(header) > limits.max_header_chars:
        raise _invalid("header_too_long", f"header has {len(header)} characters; this server accepts at most {limits.max_header_chars}")
    checked = check_untrusted(statement, header or "", limits.max_statement_chars, limits.max_header_chars)
    if plan.kind == "replay":
        raise _invalid(
            "statement_unsupported",
            "the replay backend cannot elaborate Lean text: send `theorem_id` (the full name of a theorem of "
            f"{catalog.where if catalog else 'its data'}) instead of `statement`, or run the server with a Lean backend",
        )
    from prover.theorems import theorem_from_statement

    try:
        theorem = theorem_from_statement(checked.statement, header=checked.header, theorem_id=checked.name)
    except ValueError as err:
        raise _invalid("invalid_statement", str(err)) from err
    return {"id": theorem.id, "statement": theorem.statement, "header": theorem.header}


@dataclass(frozen=True)
class CheckedInput:
    """A statement and header that passed `prover.lean.untrusted` (comments blanked: what Lean gets)."""

    statement: str
    header: str
    name: str  # the declared name, or `example`


def check_untrusted(statement: str, header: str, max_statement_chars: int, max_header_chars: int) -> CheckedInput:
    """Apply the Lean backend's untrusted-input rules; 422 naming what was found."""
    from prover.lean.untrusted import UntrustedInputError, check_header, check_statement

    try:
        checked = check_statement(statement, max_chars=max_statement_chars)
    except UntrustedInputError as err:
        raise _invalid("untrusted_statement", f"statement rejected: {err}") from err
    try:
        checked_header = check_header(header, max_chars=max_header_chars) if header else None
    except UntrustedInputError as err:
        raise _invalid("untrusted_header", f"header rejected: {err}") from err
    return CheckedInput(checked.text, checked_header.text if checked_header else "", checked.name or "example")


def check_tactics(tactics: list[str], max_chars: int) -> list[str]:
    """Screen each tactic of a proof to verify; the texts Lean gets (comments blanked)."""
    from prover.lean.untrusted import UntrustedInputError, check_tactic

    out = []
    for index, tactic in enumerate(tactics):
        try:
            out.append(check_tactic(tactic, max_chars=max_chars).text)
        except UntrustedInputError as err:
            raise _invalid("untrusted_tactic", f"tactics[{index}] rejected: {err}") from err
    return out


def effective_budget(budget: BudgetIn | None, config: ServiceConfig) -> dict[str, Any]:
    """The request's budget over the server defaults; 422 when a field exceeds its cap."""
    from search.budget import Budget

    limits = config.limits
    values = limits.default_budget.model_dump()
    if budget is not None:
        values.update(budget.model_dump(exclude_none=True))
    caps = limits.budget_caps.model_dump()
    over = [f"budget.{k} = {values[k]:g} exceeds the server's cap {caps[k]:g}" for k in caps if values[k] > caps[k]]
    if over:
        raise _invalid("budget_over_cap", "; ".join(over))
    try:
        return Budget(**values).to_json()
    except ValueError as err:
        raise _invalid("invalid_budget", str(err)) from err


def normalise_proof_request(
    body: ProofRequest, config: ServiceConfig, plan: BackendPlan, catalog: TheoremCatalog | None, generators: list[str] | None
) -> dict[str, Any]:
    """The job request for `body`; `generators` (loaded member names, None when not known yet) checks `members`."""
    theorem = resolve_theorem(body.statement, body.header, body.theorem_id, config, plan, catalog)
    members = None
    if body.members is not None:
        members = list(dict.fromkeys(body.members))  # order kept, repeats dropped (same member set)
        if generators is not None:
            unknown = [m for m in members if m not in generators]
            if unknown:
                raise _invalid("unknown_member", f"unknown ensemble members {unknown}; this server has {generators}")
    return {
        "theorem": theorem,
        "budget": effective_budget(body.budget, config),
        "strategy": body.strategy or config.backend.strategy,
        "ensemble": body.ensemble or config.backend.ensemble,
        "members": members,
    }


def normalise_check_request(body: CheckRequest, config: ServiceConfig, plan: BackendPlan, catalog: TheoremCatalog | None) -> dict[str, Any]:
    limits = config.limits
    if len(body.tactics) > limits.max_check_tactics:
        raise _invalid("too_many_tactics", f"{len(body.tactics)} tactics; this server checks at most {limits.max_check_tactics}")
    for index, tactic in enumerate(body.tactics):
        if len(tactic) > limits.max_tactic_chars:
            raise _invalid("tactic_too_long", f"tactics[{index}] has {len(tactic)} characters; at most {limits.max_tactic_chars}")
    tactics = check_tactics(body.tactics, limits.max_tactic_chars)
    theorem = resolve_theorem(body.statement, body.header, body.theorem_id, config, plan, catalog)
    return {"theorem": theorem, "tactics": tactics}
