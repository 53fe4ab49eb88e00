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


class JobView(BaseModel):
    """A proof job. `proof`/`verified` are set when `status == proved`; `result` once it has one."""

    id: str
    status: JobStatusName
    theorem_id: str
    proof: list[str] | None = None
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
    400: {"model": ErrorBody, "description": "the body could not be read (not UTF-8 / not parseable)"},
    413: {"model": ErrorBody, "description": "the body is larger than the server accepts"},
}


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
