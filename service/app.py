"""The FastAPI application: `create_app(config)`; `app_from_env()` is uvicorn's factory.

`dco-prover serve` runs `uvicorn service.app:app_from_env --factory` with the config
path in `DCO_SERVICE_CONFIG` and command-line overrides (JSON) in
`DCO_SERVICE_OVERRIDES`, so `prover` never imports `service`. One uvicorn process per
data directory: the worker pool and event hub live in it (a lock file enforces this).
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

import sqlite3

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.config import ServiceConfig, load_config
from service.errors import (
    ApiError, api_error_handler, http_error_handler, store_error_handler, unexpected_error_handler, validation_error_handler,
)
from service.store import StoreUnavailable
from service.routers import check, health, proofs
from service.state import ServiceState

CONFIG_ENV = "DCO_SERVICE_CONFIG"
OVERRIDES_ENV = "DCO_SERVICE_OVERRIDES"

API_DESCRIPTION = """Submit Lean 4 theorems, get verified proofs.

Jobs are asynchronous: `POST /v1/proofs` answers 202 with a job id once the job is stored
durably; poll `GET /v1/proofs/{id}` or follow `GET /v1/proofs/{id}/events` (server-sent
events). Every error has the body `{"error": {"code", "message"}}`; 429 and 503 carry
`Retry-After`. Authenticate with `Authorization: Bearer dco-<id>.<secret>`.
"""
SWAGGER_STATIC = "/docs-static"  # Swagger UI's files, served by this app (no CDN: /docs works offline)


def _swagger_dir() -> str | None:
    """The Swagger UI distribution of the `swagger-ui-bundle` package, when installed."""
    try:
        import swagger_ui_bundle
    except ImportError:
        return None
    return swagger_ui_bundle.swagger_ui_path


class _RequestTimer:
    """Pure-ASGI middleware: HTTP latency by method, route template and status code."""

    def __init__(self, app: ASGIApp, observe) -> None:
        self.app = app
        self.observe = observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        code = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            self.observe(scope["method"], getattr(route, "path", "unmatched"), str(code), time.perf_counter() - started)


class _BodyLimit:
    """Pure-ASGI request body limit (bytes) with the service's JSON error body.

    A declared `Content-Length` over the limit is refused before the app runs; a body
    without one is counted as it arrives and refused when it passes the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length")
        too_large = ApiError(413, "body_too_large", f"request body over {self.max_bytes} bytes")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await too_large.response()(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # FastAPI re-raises HTTPExceptions from body reading
                    raise StarletteHTTPException(413, f"request body over {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)


def create_app(config: ServiceConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = ServiceState.open(config)
        app.state.service = state
        try:
            yield
        finally:
            state.close()

    app = FastAPI(
        title="dco-prover",
        version="0.1.0",
        description=API_DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served below from bundled files
        redoc_url=None,
    )
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(StoreUnavailable, store_error_handler)
    app.add_exception_handler(sqlite3.Error, store_error_handler)
    app.add_exception_handler(Exception, unexpected_error_handler)
    _add_docs(app)
    app.include_router(proofs.batch_router)
    app.include_router(proofs.router)
    app.include_router(check.router)
    app.include_router(health.router)

    def observe(method: str, route: str, code: str, seconds: float) -> None:
        state = getattr(app.state, "service", None)
        if state is not None:
            state.metrics.http_seconds.labels(method, route, code).observe(seconds)

    app.add_middleware(_BodyLimit, max_bytes=config.limits.max_body_bytes)
    app.add_middleware(_RequestTimer, observe=observe)
    return app


def _add_docs(app: FastAPI) -> None:
    """`/docs`: Swagger UI from the `swagger-ui-bundle` package's files (Apache-2.0), served
    by this app, so the page needs no network. Without the package /docs says how to get it."""
    swagger = _swagger_dir()
    if swagger is not None:
        from starlette.staticfiles import StaticFiles

        app.mount(SWAGGER_STATIC, StaticFiles(directory=swagger), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        if swagger is None:
            return HTMLResponse(
                "<p>Swagger UI is not installed: <code>pip install swagger-ui-bundle</code> "
                "(the service extra has it). The API description is at <a href=\"/openapi.json\">/openapi.json</a>.</p>",
                status_code=503, headers={"Retry-After": "3600"},
            )
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API",
            swagger_js_url=f"{SWAGGER_STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{SWAGGER_STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{SWAGGER_STATIC}/favicon-32x32.png",
            oauth2_redirect_url="/docs/oauth2-redirect",
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()


def app_from_env() -> FastAPI:
    """uvicorn factory: config from `$DCO_SERVICE_CONFIG` (optional) and `$DCO_SERVICE_OVERRIDES` (JSON object)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = json.loads(os.environ.get(OVERRIDES_ENV, "{}") or "{}")
    config = load_config(os.environ.get(CONFIG_ENV) or None, **overrides)
    return create_app(config)
