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


@router.post(
    "/check",
    response_model=CheckResponse,
    responses={
        **BODY_ERRORS,
        401: {"model": ErrorBody}, 403: {"model": ErrorBody}, 422: {"model": ErrorBody}, 429: {"model": ErrorBody},
        503: {"model": ErrorBody, "description": "no backend, or too many checks waiting"},
        504: {"model": ErrorBody, "description": "the verification did not finish in time"},
    },
)
async def check(body: CheckRequest, principal: Principal = Depends(caller), state: ServiceState = Depends(get_state)) -> CheckResponse:
    """Re-check `tactics` as a proof of the theorem from scratch: `valid` only with no errors and no sorry."""
    started = time.monotonic()
    require_scope(principal, "check")
    request = await run_in_threadpool(normalise_check_request, body, state.config, state.plan, state.catalog)
    pool = state.pool
    if pool is None:
        raise ApiError(503, "backend_unavailable", f"no proof backend can run: {state.plan.reason}")
    limits = state.config.limits
    if pool.pending_checks >= limits.max_queue:
        raise ApiError(503, "queue_full", f"{pool.pending_checks} checks are waiting for a worker", retry_after_s=5)
    task = CheckTask(theorem=request["theorem"], tactics=request["tactics"], timeout_s=limits.check_timeout_s)
    future = pool.submit_check(task)
    try:
        ok, message = await asyncio.wait_for(asyncio.wrap_future(future), timeout=limits.check_timeout_s * 2)
    except (TimeoutError, asyncio.TimeoutError) as err:
        future.cancel()  # still waiting for a worker: it never starts
        raise ApiError(504, "check_timeout", f"the verification did not finish within {limits.check_timeout_s:g} s") from err
    except WorkerDied as err:
        raise ApiError(503, "worker_unavailable", str(err), retry_after_s=5) from err
    except RuntimeError as err:
        raise ApiError(500, "check_failed", str(err)) from err
    return CheckResponse(valid=ok, message=message, theorem_id=request["theorem"]["id"], elapsed_s=time.monotonic() - started)
