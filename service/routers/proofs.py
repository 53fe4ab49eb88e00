"""`/v1/proofs`: submit a proof job, read it, follow its progress (SSE), cancel it."""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, Header, Path, Query, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask

from service.auth import Principal, require_scope
from service.deps import caller, get_state
from service.errors import ApiError, public_text
from service.requests import normalise_proof_request
from service.results import axioms_of, counters, failure_reason, proof_text
from service.schemas import (
    BODY_ERRORS, BatchItemOut, BatchRequest, BatchResponse, ErrorBody, ErrorDetail, JobList, JobStatusName, JobView,
    ProofRequest, SubmitResponse,
)
from service.state import ServiceState
from service.store import CancelOutcome, JobRecord, JobStatus, Submission, SubmitOutcome

router = APIRouter(prefix="/v1/proofs", tags=["proofs"])
batch_router = APIRouter(tags=["proofs"])  # `/v1/proofs:batch` is not under the `/v1/proofs/` prefix

JobId = Path(..., min_length=1, max_length=64, description="the job id returned by POST /v1/proofs")
QUEUE_FULL_RETRY_S = 5.0  # Retry-After (seconds) when the queue or a key's quota is full
STREAMS_RETRY_S = 5.0  # Retry-After (seconds) when a key has its maximum of open event streams
SSE_RECHECK_S = 5.0  # seconds between store re-reads while a stream waits for events
SSE_PING_S = 15  # seconds between keep-alive comments
RESULT_EVENT_ID = "result"  # the `id:` of a stream's final event

_auth_errors = {
    401: {"model": ErrorBody, "description": "missing or invalid API key"},
    403: {"model": ErrorBody, "description": "API key disabled, revoked or not allowed this action"},
    429: {"model": ErrorBody, "description": "rate limit exceeded (see Retry-After)"},
    503: {"model": ErrorBody, "description": "the server cannot serve now (see Retry-After; the message says why)"},
}
_errors = {
    **_auth_errors,
    404: {"model": ErrorBody, "description": "no such job for this API key"},
    422: {"model": ErrorBody, "description": "invalid request; the message names the problem"},
}


def _view(job: JobRecord, queue_position: int | None = None) -> JobView:
    result = job.result
    proved = bool(result and job.status is JobStatus.PROVED and result.get("verified"))
    proof = result.get("proof") if result and job.status is JobStatus.PROVED else None
    return JobView(
        id=job.id,
        status=job.status.value,
        theorem_id=job.request["theorem"]["id"],
        proof=proof,
        proof_text=proof_text(job.request["theorem"], proof) if proved and proof else None,
        axioms=axioms_of(result) if proved and result else None,
        versions=result.get("backend_versions") if result else None,
        reason=failure_reason(result, job.request["budget"]) if result and job.status is JobStatus.FAILED else None,
        counters=counters(result) if result else None,
        queue_position=queue_position,
        verified=proved,
        search_status=result.get("status") if result else None,
        result=result,
        error=public_text(job.error) if job.error else None,
        cancel_requested=job.cancel_requested,
        attempts=job.attempts,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        request=job.request,
        events_url=f"/v1/proofs/{job.id}/events",
    )


def _full_view(state: ServiceState, job: JobRecord) -> JobView:
    return _view(job, state.store.queue_position(job))


def _owned(state: ServiceState, job_id: str, principal: Principal) -> JobRecord:
    job = state.store.get(job_id)
    if job is None or job.key_id != principal.key_id:  # another key's job is as absent as a missing one
        raise ApiError(404, "job_not_found", f"no job {job_id!r} for API key {principal.key_id!r}")
    return job


def _require_workers(state: ServiceState):
    """The worker pool, or 503 naming why no job can run."""
    pool = state.pool
    if pool is None:
        state.refresh_backend()  # a backend installed since startup (setup-lean) is found here
        pool = state.pool
    if pool is None:
        state.metrics.rejected.labels("backend_unavailable").inc()
        raise ApiError(503, "backend_unavailable", f"no proof backend can run: {state.plan.reason}")
    if pool.ready_count == 0 and all(slot.startup_error for slot in pool.slots):
        state.metrics.rejected.labels("workers_unavailable").inc()
        raise ApiError(503, "workers_unavailable", "no worker could load the backend: " + "; ".join(pool.startup_errors), retry_after_s=30)
    return pool


def _submission_error(state: ServiceState, principal: Principal, submission: Submission, idempotency_key: str | None) -> ApiError | None:
    limits = state.config.limits
    outcome = submission.outcome
    if outcome is SubmitOutcome.QUEUE_FULL:
        state.metrics.rejected.labels("queue_full").inc()
        return ApiError(503, "queue_full", f"the job queue is full ({submission.active} of {limits.max_queue} queued)", retry_after_s=QUEUE_FULL_RETRY_S)
    if outcome is SubmitOutcome.QUOTA:
        state.metrics.rejected.labels("concurrent_jobs").inc()
        return ApiError(
            429, "concurrent_jobs",
            f"API key {principal.key_id!r} already has {submission.active} queued or running jobs (its limit is {principal.max_concurrent_jobs})",
            retry_after_s=QUEUE_FULL_RETRY_S,
        )
    if outcome is SubmitOutcome.CONFLICT:
        assert submission.job is not None
        return ApiError(409, "idempotency_conflict", f"idempotency key {idempotency_key!r} was used for a different request (job {submission.job.id})")
    return None


@router.post(
    "",
    status_code=202,
    response_model=SubmitResponse,
    responses={**_auth_errors, **BODY_ERRORS, 409: {"model": ErrorBody, "description": "idempotency key reused with a different request"},
               429: {"model": ErrorBody, "description": "rate limit or concurrent-job quota exceeded (see Retry-After)"},
               503: {"model": ErrorBody, "description": "queue full, or no backend can run (see Retry-After; the message says why)"}},
)
def submit(body: ProofRequest, response: Response, principal: Principal = Depends(caller), state: ServiceState = Depends(get_state)) -> SubmitResponse:
    """Queue a proof search. Answers 202 once the job is durably stored."""
    require_scope(principal, "prove")
    pool = state.pool
    request = normalise_proof_request(body, state.config, state.plan, state.catalog, pool.generator_names or None if pool else None)
    pool = _require_workers(state)
    limits = state.config.limits
    submission = state.store.submit(
        principal.key_id,
        request,
        idempotency_key=body.idempotency_key,
        max_queue=limits.max_queue,
        max_active_for_key=principal.max_concurrent_jobs,
    )
    error = _submission_error(state, principal, submission, body.idempotency_key)
    if error is not None:
        raise error
    job = submission.job
    assert job is not None
    if submission.outcome is SubmitOutcome.CREATED:
        state.metrics.submitted.inc()
        pool.wake()
    response.headers["Location"] = f"/v1/proofs/{job.id}"
    return SubmitResponse(
        id=job.id,
        status=job.status.value,
        replayed=submission.outcome is SubmitOutcome.REPLAYED,
        budget=job.request["budget"],
        status_url=f"/v1/proofs/{job.id}",
        events_url=f"/v1/proofs/{job.id}/events",
    )


@batch_router.post(
    "/v1/proofs:batch",
    response_model=BatchResponse,
    responses={**_auth_errors, **BODY_ERRORS},
)
def submit_batch(body: BatchRequest, principal: Principal = Depends(caller), state: ServiceState = Depends(get_state)) -> BatchResponse:
    """Queue up to `limits.max_batch_items` proof searches in one call: one job each,
    answered in request order as `{"id": ...}` or `{"error": {"code", "message"}}` (an
    item's error is what POST /v1/proofs would have answered). All accepted items are
    stored in one transaction."""
    require_scope(principal, "prove")
    limits = state.config.limits
    if len(body.items) > limits.max_batch_items:
        raise ApiError(422, "too_many_items", f"{len(body.items)} items; this server accepts at most {limits.max_batch_items} per batch")
    pool = _require_workers(state)
    answers: list[BatchItemOut | None] = [None] * len(body.items)
    pending: list[tuple[int, dict[str, Any], str | None]] = []
    for index, raw in enumerate(body.items):
        try:
            item = ProofRequest.model_validate(raw)
            request = normalise_proof_request(item, state.config, state.plan, state.catalog, pool.generator_names or None)
        except ValidationError as err:
            message = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in err.errors())
            answers[index] = BatchItemOut(error=ErrorDetail(code="invalid_request", message=message))
            continue
        except ApiError as err:
            answers[index] = BatchItemOut(error=ErrorDetail(code=err.code, message=err.message))
            continue
        idem = item.idempotency_key or (f"{body.idempotency_key}/{index}" if body.idempotency_key else None)
        pending.append((index, request, idem))
    submissions = state.store.submit_many(
        principal.key_id, [(request, idem) for _, request, idem in pending],
        max_queue=limits.max_queue, max_active_for_key=principal.max_concurrent_jobs,
    ) if pending else []
    created = 0
    for (index, _, idem), submission in zip(pending, submissions):
        error = _submission_error(state, principal, submission, idem)
        if error is not None:
            answers[index] = BatchItemOut(error=ErrorDetail(code=error.code, message=error.message))
            continue
        job = submission.job
        assert job is not None
        created += submission.outcome is SubmitOutcome.CREATED
        answers[index] = BatchItemOut(id=job.id, status=job.status.value, replayed=submission.outcome is SubmitOutcome.REPLAYED,
                                      status_url=f"/v1/proofs/{job.id}")
    if created:
        state.metrics.submitted.inc(created)
        pool.wake()
    return BatchResponse(items=[a for a in answers if a is not None])


SQLITE_MAX_INT = 2**63 - 1


@router.get("", response_model=JobList, responses={**_auth_errors, 422: _errors[422]})
async def list_jobs(
    status: JobStatusName | None = Query(None, description="only jobs with this status"),
    limit: int = Query(50, ge=1, le=500, description="jobs per page"),
    cursor: str | None = Query(None, max_length=32, pattern=r"^[0-9]+$", description="`next_cursor` of the previous page"),
    principal: Principal = Depends(caller),
    state: ServiceState = Depends(get_state),
) -> JobList:
    """This API key's jobs, newest first, a page at a time."""
    # SQLite integers are 64-bit: a cursor past every sequence number means "from the newest"
    before = min(int(cursor), SQLITE_MAX_INT) if cursor is not None else None
    jobs, next_seq = await run_in_threadpool(state.store.list_for_key, principal.key_id, status=status, limit=limit, before_seq=before)
    return JobList(items=[_view(job) for job in jobs], next_cursor=str(next_seq) if next_seq is not None else None)


@router.get("/{job_id}", response_model=JobView, responses=_errors)
async def status(job_id: str = JobId, principal: Principal = Depends(caller), state: ServiceState = Depends(get_state)) -> JobView:
    """The job's status (with its queue position while queued); once finished, its proof
    (`proof_text` to paste into Lean), verified flag, axioms, and the search record."""
    # On the event loop on purpose: primary-key reads (~0.1 ms) that never wait for
    # writers in WAL mode; a thread-pool hop would cost more than the reads.
    job = _owned(state, job_id, principal)
    return _full_view(state, job)


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


class _StreamSlot:
    """One of a key's open-stream slots, released exactly once (stream end or response end)."""

    def __init__(self, state: ServiceState, key_id: str) -> None:
        self.state, self.key_id, self.held = state, key_id, True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.state.streams.release(self.key_id)


@router.get(
    "/{job_id}/events",
    responses={**_errors, 200: {"content": {"text/event-stream": {}}, "description": "server-sent events"},
               429: {"model": ErrorBody, "description": "rate limit, or this key's maximum of open event streams (see Retry-After)"}},
    response_class=EventSourceResponse,
)
async def events(
    job_id: str = JobId,
    last_event_id: str | None = Header(None, max_length=64, description="resume after this event id (sent by EventSource clients on reconnect)"),
    principal: Principal = Depends(caller),
    state: ServiceState = Depends(get_state),
) -> EventSourceResponse:
    """Server-sent events, each with an `id:`: `status` (first a snapshot: queued with
    `queue_position`, or running with the search's last `progress`; later, changes),
    `progress` (expansions or passes, max depth, elapsed seconds), then one `result` (the
    job as in GET /v1/proofs/{id}, id `result`), then the stream ends. Reconnecting with
    `Last-Event-ID` resumes: the events after it that the server still holds, else a fresh
    `status` snapshot."""
    await run_in_threadpool(_owned, state, job_id, principal)
    if not state.streams.try_acquire(principal.key_id, principal.max_open_streams):
        state.metrics.rejected.labels("too_many_streams").inc()
        raise ApiError(429, "too_many_streams", f"API key {principal.key_id!r} already has {principal.max_open_streams} open event streams (its limit)",
                       retry_after_s=STREAMS_RETRY_S)
    slot = _StreamSlot(state, principal.key_id)
    after = int(last_event_id) if last_event_id is not None and last_event_id.isdigit() else None
    if last_event_id == RESULT_EVENT_ID:
        after = -1  # the result was delivered: a reconnect gets it again
    return EventSourceResponse(_stream(state, job_id, after, slot), ping=SSE_PING_S, background=BackgroundTask(slot.release))


def _sse(event: str, data: Any, event_id: int | str) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(data), event=event, id=str(event_id))


async def _stream(state: ServiceState, job_id: str, after: int | None, slot: _StreamSlot) -> AsyncIterator[ServerSentEvent]:
    try:
        # Subscribe before reading the store: no event can fall in between.
        queue, backlog, seq, complete = state.hub.subscribe(job_id, after if after is not None and after >= 0 else None)
        try:
            job = await run_in_threadpool(state.store.get, job_id)
            if job is None:
                return
            resumed_after_end = after is not None and job.status.terminal  # all that is left to tell is the result
            if not resumed_after_end and (after is None or (after >= 0 and not complete)):  # new, or missed events
                # The state as of event `seq`: the store's row plus the search's last progress.
                position = await run_in_threadpool(state.store.queue_position, job)
                snapshot: dict[str, Any] = {"status": job.status.value, "attempts": job.attempts}
                if position is not None:
                    snapshot["queue_position"] = position
                last = state.hub.last_progress(job_id)
                if last is not None and not job.status.terminal:
                    snapshot["progress"] = {k: v for k, v in last.items() if k not in ("type", "seq")}
                yield _sse("status", snapshot, seq)
                backlog = []
            if not job.status.terminal:
                for event in backlog:
                    if event["type"] in ("progress", "status"):
                        yield _sse(event["type"], {k: v for k, v in event.items() if k not in ("type", "seq")}, event["seq"])
            while not job.status.terminal:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=SSE_RECHECK_S)
                except asyncio.TimeoutError:
                    event = None
                if event is not None and event["type"] in ("progress", "status"):
                    yield _sse(event["type"], {k: v for k, v in event.items() if k not in ("type", "seq")}, event["seq"])
                    continue
                job = await run_in_threadpool(state.store.get, job_id)  # `done`, or a periodic re-check
                if job is None:
                    return
            yield _sse("result", _view(job).model_dump(mode="json"), RESULT_EVENT_ID)
        finally:
            state.hub.unsubscribe(job_id, queue)
    finally:
        slot.release()
