"""Request dependencies: the server state and the authenticated, rate-limited caller.

Both are `async` on purpose: they do no blocking I/O (a key-file `stat` at most once per
second, an in-memory token bucket), and a sync dependency would cost a thread-pool hop per
request.
"""

from __future__ import annotations

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.auth import Principal
from service.errors import ApiError
from service.state import ServiceState

bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer dco-<id>.<secret>`")


async def get_state(request: Request) -> ServiceState:
    return request.app.state.service


async def caller(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Principal:
    """The API key's principal, after its token bucket granted this request (401/403/429 otherwise)."""
    state: ServiceState = request.app.state.service
    try:
        principal = state.keys.authenticate(credentials.credentials if credentials is not None else None)
    except ApiError as err:
        state.metrics.rejected.labels(err.code).inc()
        raise
    retry_after = state.limiter.acquire(principal)
    if retry_after is not None:
        state.metrics.rejected.labels("rate_limited").inc()
        raise ApiError(
            429,
            "rate_limited",
            f"API key {principal.key_id!r} exceeded its rate limit ({principal.rate_per_s:g} requests/s, burst {principal.burst})",
            retry_after_s=retry_after,
        )
    return principal
