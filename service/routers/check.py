"""`/v1/check`: verify a complete proof of a theorem, without search."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool

from service.auth import Principal, require_scope
from service.deps import caller, get_state
from service.errors import ApiError
from service.requests import normalise_check_request
from service.schemas import BODY_ERRORS, CheckRequest, CheckResponse, ErrorBody
from service.state import ServiceState
from service.workers import CheckTask, WorkerDied

router = APIRouter(prefix="/v1", tags=["check"])
CHECKS_RETRY_S = 2.0  # Retry-After (seconds) when a key has its maximum of checks in flight


@router.post(
    "/check",
    response_model=CheckResponse,
    responses={
        **BODY_ERRORS,
        401: {"model": ErrorBody, "description": "missing or invalid API key"},
        403: {"model": ErrorBody, "description": "API key disabled, revoked or without the `check` scope"},
        429: {"model": ErrorBody, "description": "rate limit, or this key's maximum of checks in flight (see Retry-After)"},
        503: {"model": ErrorBody, "description": "no backend, or too many checks waiting (see Retry-After)"},
        500: {"model": ErrorBody, "description": "the backend failed while verifying (the message says how)"},
        504: {"model": ErrorBody, "description": "the verification did not finish in time"},
    },
)
async def check(body: CheckRequest, principal: Principal = Depends(caller), state: ServiceState = Depends(get_state)) -> CheckResponse:
    """Re-check `tactics` as a proof of the theorem from scratch: `valid` only with no errors and no sorry."""
    started = time.monotonic()
    require_scope(principal, "check")
    request = await run_in_threadpool(normalise_check_request, body, state.config, state.plan, state.catalog)
    if state.pool is None:
        await run_in_threadpool(state.refresh_backend)  # a backend installed since startup (setup-lean)
    pool = state.pool
    if pool is None:
        raise ApiError(503, "backend_unavailable", f"no proof backend can run: {state.plan.reason}")
    if not state.checks.try_acquire(principal.key_id, principal.max_concurrent_checks):
        state.metrics.rejected.labels("too_many_checks").inc()
        raise ApiError(429, "too_many_checks", f"API key {principal.key_id!r} already has {principal.max_concurrent_checks} checks in flight (its limit)",
                       retry_after_s=CHECKS_RETRY_S)
    try:
        return await _run_check(state, pool, request, started)
    finally:
        state.checks.release(principal.key_id)


async def _run_check(state: ServiceState, pool, request: dict, started: float) -> CheckResponse:
    limits = state.config.limits
    if pool.pending_checks >= limits.max_queue:
        raise ApiError(503, "queue_full", f"{pool.pending_checks} checks are waiting for a worker", retry_after_s=5)
    task = CheckTask(theorem=request["theorem"], tactics=request["tactics"], timeout_s=limits.check_timeout_s)
    future = pool.submit_check(task)
    try:
        ok, message = await asyncio.wait_for(asyncio.wrap_future(future), timeout=limits.check_timeout_s * 2)
    except asyncio.CancelledError:
        future.cancel()  # the client left: a check still waiting for a worker never starts
        raise
    except (TimeoutError, asyncio.TimeoutError) as err:
        future.cancel()  # still waiting for a worker: it never starts
        raise ApiError(504, "check_timeout", f"the verification did not finish within {limits.check_timeout_s:g} s") from err
    except WorkerDied as err:
        raise ApiError(503, "worker_unavailable", str(err), retry_after_s=5) from err
    except RuntimeError as err:
        raise ApiError(500, "check_failed", str(err)) from err
    return CheckResponse(valid=ok, message=message, theorem_id=request["theorem"]["id"], elapsed_s=time.monotonic() - started)
