"""Request and response models of the HTTP API (they generate the OpenAPI schema at /docs).

Static bounds here keep absurd inputs out early; the configured limits (`service.config`)
are checked by `service.requests` with messages that name the limit.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JobStatusName = Literal["queued", "running", "proved", "failed", "cancelled", "error"]
Strategy = Literal["best_first", "sampling"]
EnsembleMode = Literal["union", "mixture"]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BudgetIn(_In):
    """Search budget; omitted fields take the server's defaults. Every field is capped by the server."""

    max_depth: int | None = Field(None, ge=1, le=1_000_000, description="proof steps on a path")
    time_limit_s: float | None = Field(None, gt=0, le=1e7, description="wall-clock seconds for the whole search")
    max_expansions: int | None = Field(None, ge=1, le=100_000_000, description="best-first node expansions")
    tactics_per_expansion: int | None = Field(None, ge=1, le=100_000, description="candidates per expansion")
    max_passes: int | None = Field(None, ge=1, le=100_000_000, description="sampling passes (pass@N)")
    tactic_timeout_s: float | None = Field(None, gt=0, le=1e6, description="wall-clock seconds per tactic")


class ProofRequest(_In):
    """A theorem to prove: either a Lean `statement` or the `theorem_id` of a theorem the server knows.

    - `statement`: one `theorem`/`lemma`/`example` declaration without its proof
      (e.g. `theorem t (n : Nat) : n + 0 = n`); `header` holds its imports (allowed ones only).
      Needs a Lean backend.
    - `theorem_id`: a theorem of the server's theorem source (the replay backend's recorded
      LeanDojo theorems by `full_name`, or miniF2F names with a Lean backend; see /readyz).
    """

    statement: str | None = Field(None, min_length=1, max_length=1_000_000)
    header: str | None = Field(None, max_length=100_000)
    theorem_id: str | None = Field(None, min_length=1, max_length=512)
    budget: BudgetIn | None = None
    strategy: Strategy | None = Field(None, description="default: the server's configured strategy")
    ensemble: EnsembleMode | None = Field(None, description="how several members combine (default: server's)")
    members: list[str] | None = Field(
        None, min_length=1, max_length=64, description="ensemble members (generator names) to use; default: all"
    )
    idempotency_key: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        pattern=r"^[\x21-\x7e]+$",
        description="resubmitting with the same key and request returns the same job",
    )


class CheckRequest(_In):
    """A complete proof to verify, without search: a theorem (as in `ProofRequest`) and its tactics."""

    statement: str | None = Field(None, min_length=1, max_length=1_000_000)
    header: str | None = Field(None, max_length=100_000)
    theorem_id: str | None = Field(None, min_length=1, max_length=512)
    tactics: list[str] = Field(..., min_length=1, max_length=100_000, description="the proof, one tactic per entry")


class SearchResultOut(BaseModel):
    """The search result record (`search.result.SearchResult`); times in wall-clock seconds."""

    model_config = ConfigDict(extra="allow")

    theorem_id: str
    status: str = Field(description="proved | failed | budget_exhausted | timeout | error | cancelled")
    strategy: str
    proof: list[str] | None = None
    verified: bool = False
    verification_message: str = ""
    member: str | None = None
    passes: int = 0
    expansions: int = 0
    lean_calls: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    generator_calls: int = 0
    generator_time_s: float = 0.0
    lean_time_s: float = 0.0
    wall_time_s: float = 0.0
    max_depth_reached: int = 0
    errors: list[str] = Field(default_factory=list)
    members: dict[str, "SearchResultOut"] = Field(default_factory=dict)


FailureReason = Literal["budget_exhausted", "all_branches_failed", "depth_cap", "timeout"]


class SearchCounters(BaseModel):
    """What the search did (the whole ensemble's totals); times in wall-clock seconds."""

    expansions: int = 0
    passes: int = 0
    lean_calls: int = 0
    generator_calls: int = 0
    max_depth_reached: int = 0
    wall_time_s: float = 0.0
    lean_time_s: float = 0.0
    generator_time_s: float = 0.0


class BackendVersions(BaseModel):
    """The Lean and Mathlib versions of the backend that ran the job (null: not known, e.g.
    the replay backend, whose recorded data names no versions)."""

    backend: str | None = None
    lean: str | None = None
    mathlib: str | None = None


class JobView(BaseModel):
    """A proof job. `proof`/`proof_text`/`verified` are set when `status == proved`; `result` once it has one."""

    id: str
    status: JobStatusName
    theorem_id: str
    proof: list[str] | None = None
    proof_text: str | None = Field(
        None,
        description="the verified proof as Lean text to paste: the whole `theorem … := by` block (the replay "
        "backend has no statement text: `theorem <name> := by` and the tactics)",
    )
    axioms: list[str] | None = Field(
        None, description="axioms the verified proof depends on, as the Lean backend's audit printed them; null when the backend does not audit axioms (replay)"
    )
    versions: BackendVersions | None = Field(None, description="Lean and Mathlib versions of the backend that ran the job")
    reason: FailureReason | None = Field(None, description="why a failed job failed")
    counters: SearchCounters | None = Field(None, description="the search's counters, once it has a result")
    queue_position: int | None = Field(None, ge=1, description="while queued: 1 for the next job a worker takes")
    verified: bool = False
    search_status: str | None = Field(None, description="the search result's own status (e.g. budget_exhausted)")
    result: SearchResultOut | None = None
    error: str | None = None
    cancel_requested: bool = False
    attempts: int = Field(description="runs started (a run interrupted by a server restart counts)")
    created_at: float = Field(description="Unix seconds")
    started_at: float | None = None
    finished_at: float | None = None
    request: dict[str, Any] = Field(description="the normalised request, with the effective budget")
    events_url: str


class SubmitResponse(BaseModel):
    id: str
    status: JobStatusName
    replayed: bool = Field(description="true when an earlier job with the same idempotency key was returned")
    budget: dict[str, Any] = Field(description="the effective budget after server defaults")
    status_url: str
    events_url: str


class JobList(BaseModel):
    """A page of a key's jobs, newest first; pass `next_cursor` as `cursor` for the next page (null: no more)."""

    items: list[JobView]
    next_cursor: str | None


class BatchRequest(_In):
    """Several proof requests in one call: one job each, answered in request order.

    `idempotency_key` (optional) makes the whole batch idempotent: item `i` without its own
    key uses `<idempotency_key>/<i>`, so resending the batch returns the same jobs.
    """

    items: list[dict[str, Any]] = Field(..., min_length=1, max_length=10_000, description="proof requests (as POST /v1/proofs)")
    idempotency_key: str | None = Field(None, min_length=1, max_length=180, pattern=r"^[\x21-\x7e]+$")


class BatchItemOut(BaseModel):
    """One item's answer: `id` (and its job fields) when accepted, else `error`."""

    id: str | None = None
    status: JobStatusName | None = None
    replayed: bool | None = None
    status_url: str | None = None
    error: "ErrorDetail | None" = None


class BatchResponse(BaseModel):
    items: list[BatchItemOut]


class CheckResponse(BaseModel):
    valid: bool = Field(description="the proof elaborates with no errors and no sorry")
    message: str = Field(description="why not, when not valid")
    theorem_id: str
    elapsed_s: float = Field(description="seconds from request to answer")


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: list[dict[str, Any]] | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


BODY_ERRORS = {
    413: {"model": ErrorBody, "description": "the body is larger than the server accepts"},
    422: {"model": ErrorBody, "description": "invalid request (malformed JSON included); the message names the problem"},
}
BatchItemOut.model_rebuild()


class Health(BaseModel):
    status: Literal["ok"]


class ReadinessCheck(BaseModel):
    name: str
    ok: bool
    detail: str = ""
    how_to_fix: str = ""


class Readiness(BaseModel):
    ready: bool
    backend: str = Field(description="the backend in use (replay | repl) or none")
    theorem_source: str
    generators: list[str] = Field(description="tactic generators (ensemble members) the workers loaded")
    workers: int = Field(description="worker processes ready to run jobs")
    checks: list[ReadinessCheck]
