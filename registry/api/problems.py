"""The one place where errors become HTTP responses: RFC 9457 problem+json with a ``code``.

``registry.errors.AgoraError`` subclasses carry their status; FastAPI's request validation
errors become 400 ``invalid_request`` with field-level ``errors``; routing misses (404, 405)
keep their status with a stable code; a database that cannot be reached is 503
``database_unavailable``; anything else is a logged 500 ``internal_error``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from registry.errors import (
    AgoraError,
    BadRequest,
    RangeNotSatisfiable,
    ServiceUnavailable,
    Unauthenticated,
)

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger("registry.api")

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
}


def problem_response(
    body: dict[str, Any], status: int, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _agora_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AgoraError)
    headers: dict[str, str] = {}
    if isinstance(exc, RangeNotSatisfiable):
        headers.update(exc.headers)
    if isinstance(exc, Unauthenticated):
        # RFC 6750: a 401 names the scheme the client should use.
        headers["WWW-Authenticate"] = 'Bearer realm="agora"'
    if exc.status >= 500:
        log.error("%s %s failed: %s", request.method, request.url.path, exc.detail)
    return problem_response(exc.problem(instance=request.url.path), exc.status, headers)


def _request_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {
            "loc": [str(part) for part in err.get("loc", ())],
            "msg": str(err.get("msg", "")),
            "type": str(err.get("type", "")),
        }
        for err in exc.errors()
    ]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    detail = f"{'.'.join(first['loc'])}: {first['msg']}" if first["loc"] else str(first["msg"])
    err = BadRequest(detail, code="invalid_request", errors=errors)
    return problem_response(err.problem(instance=request.url.path), err.status)


def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    body = {
        "type": f"https://agora.dev/problems/{code.replace('_', '-')}",
        "title": code.replace("_", " ").capitalize(),
        "status": exc.status_code,
        "detail": str(exc.detail),
        "code": code,
        "instance": request.url.path,
    }
    headers = dict(exc.headers) if exc.headers else None
    return problem_response(body, exc.status_code, headers)


def _database_down(request: Request, exc: Exception) -> JSONResponse:
    # A lost connection, a failed-over primary, SQLite "database is locked" past its busy
    # timeout: the request may succeed later, so 503 + Retry-After (the SDK retries those).
    log.warning("database error in %s %s: %s", request.method, request.url.path, exc)
    err = ServiceUnavailable(
        "the database is unavailable; retry shortly", code="database_unavailable"
    )
    return problem_response(
        err.problem(instance=request.url.path), err.status, {"Retry-After": "2"}
    )


def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    err = AgoraError("the server failed to handle this request; it has been logged")
    return problem_response(err.problem(instance=request.url.path), err.status)


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AgoraError, _agora_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(OperationalError, _database_down)
    app.add_exception_handler(Exception, _unhandled)
