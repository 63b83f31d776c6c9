"""The one place where errors become HTTP responses: RFC 9457 problem+json with a ``code``.

``registry.errors.AgoraError`` subclasses carry their status; FastAPI's request validation
errors become 400 ``invalid_request`` with field-level ``errors``; routing misses (404, 405)
keep their status with a stable code; a database that cannot be reached is 503
``database_unavailable``; a value the database refuses to store is 400 ``invalid_value``;
anything else is a logged 500 ``internal_error``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from registry.errors import (
    AgoraError,
    BadRequest,
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
    # A request body that stalls (registry/api/limits.py raises it from `receive`).
    408: "request_timeout",
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
    # Headers an error carries (a 416's Content-Range, a 409's or 503's Retry-After).
    headers: dict[str, str] = dict(getattr(exc, "headers", None) or {})
    if isinstance(exc, ServiceUnavailable):
        # The database, the store or the staging area may be back shortly: the SDK retries.
        headers.setdefault("Retry-After", "2")
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


def http_problem(request: Request, exc: Exception) -> JSONResponse:
    """A routing error (404, 405...) as a problem, its headers (``Allow``) kept."""
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


def _unstorable(request: Request, exc: Exception) -> JSONResponse:
    """A client's value the database refused: a 400, logged (a check before it missed it).

    Defence in depth: registry/api/hygiene.py and validation refuse what a column cannot
    hold (NUL, lone surrogates, out-of-range integers) before a route queries with it. What
    still reaches the database and is refused there (a ``DataError``; a lone surrogate the
    driver cannot encode; an integer SQLite cannot bind) came from the request.
    """
    if isinstance(exc, UnicodeEncodeError) and exc.reason != "surrogates not allowed":
        return _unhandled(request, exc)
    if isinstance(exc, OverflowError) and "SQLite INTEGER" not in str(exc):
        return _unhandled(request, exc)
    log.warning(
        "a value in %s %s was refused by the database: %s",
        request.method,
        request.url.path,
        str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__,
    )
    err = BadRequest(
        "a value in this request cannot be stored (a NUL character, an unpaired surrogate, "
        "a number or a text out of range)",
        code="invalid_value",
    )
    return problem_response(err.problem(instance=request.url.path), err.status)


def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    err = AgoraError("the server failed to handle this request; it has been logged")
    return problem_response(err.problem(instance=request.url.path), err.status)


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AgoraError, _agora_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(StarletteHTTPException, http_problem)
    app.add_exception_handler(OperationalError, _database_down)
    app.add_exception_handler(DataError, _unstorable)
    app.add_exception_handler(UnicodeEncodeError, _unstorable)
    app.add_exception_handler(OverflowError, _unstorable)
    app.add_exception_handler(Exception, _unhandled)
