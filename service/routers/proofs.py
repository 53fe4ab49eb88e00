"""`/v1/proofs`: submit a proof job, read it, follow its progress (SSE), cancel it."""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, Path, Response
from fastapi.concurrency import run_in_threadpool
from sse_starlette import EventSourceResponse, ServerSentEvent

from service.auth import Principal, require_scope
from service.deps import caller, get_state
from service.errors import ApiError
from service.requests import normalise_proof_request
from service.schemas import BODY_ERRORS, ErrorBody, JobView, ProofRequest, SubmitResponse
from service.state import ServiceState
from service.store import CancelOutcome, JobRecord, JobStatus, SubmitOutcome

router = APIRouter(prefix="/v1/proofs", tags=["proofs"])

JobId = Path(..., min_length=1, max_length=64, description="the job id returned by POST /v1/proofs")
QUEUE_FULL_RETRY_S = 5.0  # Retry-After (seconds) when the queue or a key's quota is full
SSE_RECHECK_S = 5.0  # seconds between store re-reads while a stream waits for events
SSE_PING_S = 15  # seconds between keep-alive comments

_errors = {
    401: {"model": ErrorBody, "description": "missing or invalid API key"},
    403: {"model": ErrorBody, "description": "API key disabled or not allowed this action"},
    404: {"model": ErrorBody, "description": "no such job for this API key"},
    422: {"model": ErrorBody, "description": "invalid request; the message names the problem"},
    429: {"model": ErrorBody, "description": "rate limit or concurrent-job quota exceeded (see Retry-After)"},
}


def _view(job: JobRecord) -> JobView:
    result = job.result
    return JobView(
        id=job.id,
        status=job.status.value,
        theorem_id=job.request["theorem"]["id"],
        proof=result.get("proof") if result and job.status is JobStatus.PROVED else None,
        verified=bool(result and job.status is JobStatus.PROVED and result.get("verified")),
        search_status=result.get("status") if result else None,
        result=result,
        error=job.error,
        cancel_requested=job.cancel_requested,
        attempts=job.attempts,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        request=job.request,
        events_url=f"/v1/proofs/{job.id}/events",
    )


def _owned(state: ServiceState, job_id: str, principal: Principal) -> JobRecord:
    job = state.store.get(job_id)
    if job is None or job.key_id != principal.key_id:  # another key's job is as absent as a missing one
        raise ApiError(404, "job_not_found", f"no job {job_id!r} for API key {principal.key_id!r}")
    return job


@router.post(
    "",
    status_code=202,
    response_model=SubmitResponse,
    responses={**_errors, **BODY_ERRORS, 409: {"model": ErrorBody, "description": "idempotency key reused with a different request"},
               503: {"model": ErrorBody, "description": "queue full, or no backend can run (the message says why)"}},
)
def submit(body: ProofRequest, response: Response, principal: Principal = Depends(caller), state: ServiceState = Depends(get_state)) -> SubmitResponse:
    """Queue a proof search. Answers 202 once the job is durably stored."""
    require_scope(principal, "prove")
    pool = state.pool
    request = normalise_proof_request(body, state.config, state.plan, state.catalog, pool.generator_names or None if pool else None)
    if pool is None:
        state.metrics.rejected.labels("backend_unavailable").inc()
        raise ApiError(503, "backend_unavailable", f"no proof backend can run: {state.plan.reason}")
    if pool.ready_count == 0 and all(slot.startup_error for slot in pool.slots):
        state.metrics.rejected.labels("workers_unavailable").inc()
        raise ApiError(503, "workers_unavailable", "no worker could load the backend: " + "; ".join(pool.startup_errors), retry_after_s=30)
    limits = state.config.limits
    submission = state.store.submit(
        principal.key_id,
        request,
        idempotency_key=body.idempotency_key,
        max_queue=limits.max_queue,
        max_active_for_key=principal.max_concurrent_jobs,
    )
    outcome = submission.outcome
    if outcome is SubmitOutcome.QUEUE_FULL:
        state.metrics.rejected.labels("queue_full").inc()
        raise ApiError(503, "queue_full", f"the job queue is full ({submission.active} of {limits.max_queue} queued)", retry_after_s=QUEUE_FULL_RETRY_S)
    if outcome is SubmitOutcome.QUOTA:
        state.metrics.rejected.labels("concurrent_jobs").inc()
        raise ApiError(
            429, "concurrent_jobs",
            f"API key {principal.key_id!r} already has {submission.active} queued or running jobs (its limit is {principal.max_concurrent_jobs})",
            retry_after_s=QUEUE_FULL_RETRY_S,
        )
    if outcome is SubmitOutcome.CONFLICT:
        raise ApiError(409, "idempotency_conflict", f"idempotency key {body.idempotency_key!r} was used for a different request (job {submission.job.id})")
    job = submission.job
    assert job is not None
    if outcome is SubmitOutcome.CREATED:
        state.metrics.submitted.inc()
        pool.wake()
    response.headers["Location"] = f"/v1/proofs/{job.id}"
    return SubmitResponse(
        id=job.id,
        status=job.status.value,
        replayed=outcome is SubmitOutcome.REPLAYED,
        budget=job.request["budget"],
        status_url=f"/v1/proofs/{job.id}",
        events_url=f"/v1/proofs/{job.id}/events",
    )


@router.get("/{job_id}", response_model=JobView, responses=_errors)
async def status(job_id: str = JobId, principal: Principal = Depends(caller), state: ServiceState = Depends(get_state)) -> JobView:
    """The job's status; once finished, its proof, verified flag and search record."""
    # On the event loop on purpose: one primary-key read (~0.1 ms) that never waits for
    # writers in WAL mode; a thread-pool hop would cost more than the read.
    return _view(_owned(state, job_id, principal))


@router.delete(
    "/{job_id}",
    response_model=JobView,
    responses={**_errors, 202: {"model": JobView, "description": "running: its search is told to stop"},
               409: {"model": ErrorBody, "description": "the job already finished"}},
)
def cancel(response: Response, job_id: str = JobId, principal: Principal = Depends(caller), state: ServiceState = Depends(get_state)) -> JobView:
    """Cancel a job: a queued job is cancelled at once (200); a running search stops within one
    tactic timeout (202; follow it to `cancelled`)."""
    _owned(state, job_id, principal)
    outcome, job = state.store.request_cancel(job_id)
    if outcome is CancelOutcome.NOT_FOUND or job is None:
        raise ApiError(404, "job_not_found", f"no job {job_id!r}")
    if outcome is CancelOutcome.FINISHED:
        raise ApiError(409, "already_finished", f"job {job_id} already finished with status {job.status.value}")
    if outcome is CancelOutcome.CANCELLED:
        state.hub.publish(job_id, {"type": "done", "status": "cancelled"})
    if job.status is JobStatus.RUNNING:
        if state.pool is not None:
            state.pool.cancel(job_id)
        response.status_code = 202
    return _view(job)


@router.get(
    "/{job_id}/events",
    responses={**_errors, 200: {"content": {"text/event-stream": {}}, "description": "server-sent events"}},
    response_class=EventSourceResponse,
)
async def events(job_id: str = JobId, principal: Principal = Depends(caller), state: ServiceState = Depends(get_state)) -> EventSourceResponse:
    """Server-sent events: `status` (queued/running), `progress` (expansions or passes,
    max depth, elapsed seconds), then one `result` (the job as in GET /v1/proofs/{id}), then the stream ends."""
    await run_in_threadpool(_owned, state, job_id, principal)
    return EventSourceResponse(_stream(state, job_id), ping=SSE_PING_S)


def _sse(event: str, data: Any) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(data), event=event)


async def _stream(state: ServiceState, job_id: str) -> AsyncIterator[ServerSentEvent]:
    queue = state.hub.subscribe(job_id)  # before reading the store: no event can fall in between
    try:
        job = await run_in_threadpool(state.store.get, job_id)
        if job is None:
            return
        yield _sse("status", {"status": job.status.value, "attempts": job.attempts})
        while not job.status.terminal:
            try:
                event = await asyncio.wait_for(queue.get(), timeout=SSE_RECHECK_S)
            except asyncio.TimeoutError:
                event = None
            if event is not None and event["type"] == "progress":
                yield _sse("progress", {k: v for k, v in event.items() if k != "type"})
                continue
            if event is not None and event["type"] == "status":
                yield _sse("status", {k: v for k, v in event.items() if k != "type"})
                continue
            job = await run_in_threadpool(state.store.get, job_id)  # `done`, or a periodic re-check
            if job is None:
                return
        yield _sse("result", _view(job).model_dump(mode="json"))
    finally:
        state.hub.unsubscribe(job_id, queue)
