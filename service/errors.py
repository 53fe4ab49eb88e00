"""One JSON error shape for every failure: `{"error": {"code": ..., "message": ...}}`."""

from __future__ import annotations

import logging
import math
import re

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


log = logging.getLogger("service")

DEFAULT_503_RETRY_S = 30.0  # Retry-After (seconds) of a 503 that names no better time
_API_PATHS = ("/v1/", "/healthz", "/readyz", "/metrics", "/docs", "/openapi", "/static/")
# An absolute file-system path: `/` then at least one more `/`-separated component.
_ABS_PATH = re.compile(r"(?<![\w.:/~-])(/[^\s/'\"`,;()\[\]{}<>]+)+/?")


def public_text(text: str) -> str:
    """`text` with absolute server paths cut to their last component (`.../name`): public
    messages must not reveal the server's file layout. API routes are left alone."""

    def shorten(match: re.Match) -> str:
        path = match.group(0)
        if path.startswith(_API_PATHS) or path.count("/") < 2:
            return path
        name = path.rstrip("/").rsplit("/", 1)[-1]
        return f".../{name}"

    return _ABS_PATH.sub(shorten, text)


def retry_after_value(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


class ApiError(Exception):
    """An HTTP error with a machine-readable `code` and a message naming the problem.

    `retry_after_s` (seconds) becomes a `Retry-After` header, rounded up to whole seconds;
    every 503 has one (`DEFAULT_503_RETRY_S` unless given). The message is made public
    through `public_text`.
    """

    def __init__(self, status: int, code: str, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = public_text(message)
        if retry_after_s is None and status == 503:
            retry_after_s = DEFAULT_503_RETRY_S
        self.retry_after_s = retry_after_s

    def response(self) -> JSONResponse:
        headers = {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = retry_after_value(self.retry_after_s)
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse({"error": {"code": self.code, "message": self.message}}, status_code=self.status, headers=headers)


def _describe(errors: list[dict]) -> str:
    parts = []
    for err in errors:
        if err.get("type") == "json_invalid":  # loc is (body, character offset)
            offset = err.get("loc", ("body", "?"))[-1]
            parts.append(f"body: malformed JSON (at character {offset})")
            continue
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


async def api_error_handler(_: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


async def validation_error_handler(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [{k: v for k, v in e.items() if k in {"loc", "msg", "type"}} for e in exc.errors()]
    return JSONResponse(
        {"error": {"code": "invalid_request", "message": _describe(errors), "details": errors}}, status_code=422
    )


async def http_error_handler(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        # FastAPI's answer to a body it cannot decode (e.g. not UTF-8): malformed like bad JSON, so 422
        return JSONResponse({"error": {"code": "invalid_request", "message": "body: malformed (not UTF-8 JSON)"}}, status_code=422)
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 503:
        headers.setdefault("Retry-After", retry_after_value(DEFAULT_503_RETRY_S))
    return JSONResponse(
        {"error": {"code": f"http_{exc.status_code}", "message": public_text(str(exc.detail))}},
        status_code=exc.status_code,
        headers=headers or None,
    )


async def store_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """The job store failed (no connection, database gone): 503 with Retry-After, never a bare 500."""
    log.error("job store error on %s %s: %s", request.method, request.url.path, exc)
    return ApiError(503, "store_unavailable", f"the job store cannot be used now: {exc}").response()


async def unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Any other exception: logged with its traceback; the client gets the JSON error shape."""
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": {"code": "internal_error", "message": "internal server error (logged)"}}, status_code=500)
