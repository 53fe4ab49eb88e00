"""Liveness (`/healthz`), readiness with reasons (`/readyz`) and Prometheus metrics (`/metrics`)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.backend import endpoint_checks
from service.deps import get_state
from service.errors import DEFAULT_503_RETRY_S, public_text, retry_after_value
from service.schemas import Health, Readiness, ReadinessCheck
from service.state import ServiceState
from service.store import StoreUnavailable

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process answers HTTP (nothing else is checked)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness, "description": "not ready; see the failed checks (with Retry-After)"}})
def readyz(state: ServiceState = Depends(get_state)) -> JSONResponse:
    """Ready when a backend is chosen, a worker has loaded it (with its models), the job store
    works and the API key file is readable. Without a backend, each call re-checks whether one
    can run now (e.g. after `dco-prover setup-lean`) and starts the workers when it can."""
    state.refresh_backend()
    checks = [ReadinessCheck(**c.to_json()) for c in state.plan.checks]
    pool = state.pool
    if pool is not None:
        ready = pool.ready_count
        total = len(pool.slots)
        errors = pool.startup_errors
        if ready:
            detail = f"{ready} of {total} worker processes ready; generators {pool.generator_names}"
        elif errors:
            detail = "no worker could load the backend: " + "; ".join(errors)
        else:
            detail = f"0 of {total} worker processes ready yet (loading the backend and models)"
        checks.append(ReadinessCheck(name="workers", ok=ready > 0, detail=detail, how_to_fix="" if ready or not errors else "fix the backend/model configuration named above"))
    else:
        checks.append(ReadinessCheck(name="workers", ok=False, detail="not started: no backend can run", how_to_fix="see the failed checks above"))
    try:
        state.store.probe()
        depth = state.store.queue_depth()
        checks.append(ReadinessCheck(name="job store", ok=True, detail=f"{state.config.db_path.name}; {depth} jobs queued; retention: {state.last_purge}"))
    except StoreUnavailable as err:
        checks.append(ReadinessCheck(name="job store", ok=False, detail=str(err), how_to_fix="restore the data directory, then restart the server"))
    except Exception as err:  # readiness must report, not fail
        checks.append(ReadinessCheck(name="job store", ok=False, detail=f"{type(err).__name__}: {err}"))
    keys_ok, keys_detail = state.keys.status()
    checks.append(ReadinessCheck(name="api keys", ok=keys_ok, detail=keys_detail,
                                 how_to_fix="" if keys_ok else "repair the key file (or restore it) with `dco-prover keys list` to verify"))
    if state.catalog is not None:
        checks.append(ReadinessCheck(name="theorem source", ok=True, detail=f"{len(state.catalog)} theorems can be named by theorem_id ({state.catalog.where})"))
    else:
        checks.append(ReadinessCheck(name="theorem source", ok=False, detail=state.catalog_error or "none", how_to_fix="set backend.replay_data / backend.theorem_source"))
    from prover.lean.readiness import sandbox_check  # issue 10: is Lean sandboxed (bubblewrap)?

    sandbox = sandbox_check()
    checks.append(ReadinessCheck(name="lean sandbox", ok=sandbox.ok or not sandbox.required, detail=sandbox.detail, how_to_fix=sandbox.how_to_fix))
    # Model servers shared by the workers (generators.kind = 'openai'): each member's health.
    checks.extend(ReadinessCheck(**c.to_json()) for c in endpoint_checks(state.config))
    body = Readiness(
        ready=all(c.ok for c in checks),
        backend=state.plan.kind or "none",
        theorem_source=state.catalog.where if state.catalog is not None else state.plan.theorem_source,
        generators=pool.generator_names if pool is not None else [],
        workers=pool.ready_count if pool is not None else 0,
        checks=[c.model_copy(update={"detail": public_text(c.detail), "how_to_fix": public_text(c.how_to_fix)}) for c in checks],
    )
    headers = None if body.ready else {"Retry-After": retry_after_value(DEFAULT_503_RETRY_S)}
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if body.ready else 503, headers=headers)


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(state: ServiceState = Depends(get_state)) -> Response:
    """Prometheus text format: queue depth, jobs by status, search/Lean/generator latencies, rejections."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
