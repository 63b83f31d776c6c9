"""Request hygiene: what is refused before any route runs, so that no route has to.

``RequestHygiene`` is a pure ASGI middleware. registry/app.py installs it inside the limits
middleware (registry/api/limits.py: a body is read only after the rate and search-slot
checks, through its paced ``receive``) and the metrics one (refusals are counted). It
answers 4xx problem+json for:

* a NUL character, raw or ``%00``, in the path, the query string or a header value: 400
  ``invalid_characters`` naming the part. No id, name or parameter of this API holds one,
  and PostgreSQL refuses NUL in text: the lookup it would reach fails as a server error.
* a body larger than ``Settings.json_body_limit`` (``AGORA_MAX_JSON_BODY_BYTES``): 413
  ``request_too_large``, from Content-Length before a byte is read, else counted while a
  chunked body arrives. The multipart uploads a route streams to staging files are left
  alone (registry/api/uploads.py enforces their per-file limits while streaming): a route
  streams one when its OpenAPI request body documents ``multipart/form-data``.
* a JSON body (``application/json``, ``*+json``, or no Content-Type, which FastAPI also
  reads as JSON) holding a string or key with a NUL or a lone UTF-16 surrogate (400
  ``invalid_characters``), ``NaN``/``Infinity`` or a number beyond the float range (400
  ``invalid_json``: not JSON, and no database JSON column stores them), or nesting deeper
  than ``MAX_JSON_DEPTH`` (400 ``json_too_deep``). ``errors`` names each JSON path.

A body is read once, at most the cap, checked, and replayed to the app unchanged; a body
that is not JSON at all goes on to the app, which answers its own 400. The same string and
depth checks are exposed as ``check_json_text`` for JSON that arrives inside a multipart
field (a job result).
"""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi.routing import APIRoute, iter_route_contexts
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from registry.api.problems import http_problem, problem_response
from registry.errors import AgoraError, BadRequest, PayloadTooLarge
from registry.validation.text import text_problems

# The API's bodies nest a few levels (a job result's details, a composition's params);
# 64 is far beyond them, and far below the depth at which encoding a value recursively
# (json.dumps on the way to a JSON column) would exhaust the interpreter's stack.
MAX_JSON_DEPTH = 64


class NotJSONNumber(ValueError):
    """``NaN``, ``Infinity`` or a literal beyond the float range: ``json.loads`` takes them."""


def reject_json_constant(name: str) -> Any:
    """``parse_constant`` for ``json.loads``: NaN and Infinity are not JSON (RFC 8259)."""
    raise NotJSONNumber(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise NotJSONNumber(f"the number {text[:40]} is beyond the float range")
    return value


def _json_text_error(value: Any, root: str) -> BadRequest | None:
    problems = text_problems(value, root, max_depth=MAX_JSON_DEPTH)
    if not problems:
        return None
    errors = [p.as_error() for p in problems]
    first = problems[0]
    if any(p.too_deep for p in problems):
        return BadRequest(
            f"{first.path}: JSON nested deeper than {MAX_JSON_DEPTH} levels",
            code="json_too_deep",
            errors=errors,
        )
    return BadRequest(f"{first.path}: {first.message}", code="invalid_characters", errors=errors)


def check_json_text(value: Any, root: str = "$") -> None:
    """Raise the 400 the middleware answers for a parsed JSON ``value`` (paths from ``root``)."""
    error = _json_text_error(value, root)
    if error is not None:
        raise error


def _is_json(content_type: str | None) -> bool:
    if content_type is None:
        return True  # FastAPI parses a body without a Content-Type as JSON
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def _declared_length(value: str | None) -> int | None:
    """Content-Length as a number (capped: 19 digits and more are all "too large")."""
    text = (value or "").strip()
    if not text or not (text.isascii() and text.isdigit()):
        return None  # absent or malformed: the body is counted as it arrives
    return int(text[:19])


def _url_problem(scope: Scope) -> BadRequest | None:
    if "\x00" in scope["path"] or b"%00" in (scope.get("raw_path") or b""):
        return BadRequest(
            "the path holds a NUL character; no id or name contains one",
            code="invalid_characters",
            errors=[{"path": "path", "message": "contains a NUL character"}],
        )
    query = scope.get("query_string") or b""
    if b"\x00" in query or b"%00" in query:
        return BadRequest(
            "the query string holds a NUL character (%00); no parameter takes one",
            code="invalid_characters",
            errors=[{"path": "query", "message": "contains a NUL character"}],
        )
    for key, value in scope["headers"]:
        if b"\x00" in key or b"\x00" in value:
            name = bytes(key).replace(b"\x00", b"").decode("latin-1")[:60]
            return BadRequest(
                f"the header {name!r} holds a NUL character",
                code="invalid_characters",
                errors=[{"path": f"header {name}", "message": "contains a NUL character"}],
            )
    return None


class RequestHygiene:
    """Pure ASGI middleware (a BaseHTTPMiddleware would buffer every streamed body)."""

    def __init__(self, app: ASGIApp, *, router: Router, max_body_bytes: int) -> None:
        self.app = app
        self.router = router
        self.max_body_bytes = max_body_bytes
        self._streams: dict[int, bool] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem = _url_problem(scope)
        if problem is not None:
            await _answer(problem, scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is None and _header(scope, b"transfer-encoding") is None:
            await self.app(scope, receive, send)  # no body
            return
        content_type = _header(scope, b"content-type")
        if self._streams_upload(scope, content_type):
            await self.app(scope, receive, send)
            return
        cap = self.max_body_bytes
        declared = _declared_length(length)
        if declared is not None and declared > cap:
            await _answer(_too_large(declared, cap), scope, receive, send)
            return
        body = bytearray()
        while True:
            try:
                message = await receive()
            except HTTPException as exc:
                # A stalled body (registry/api/limits.py raises 408 from `receive`): answered
                # here as the app would, since no route is running yet to pass it on.
                await http_problem(Request(scope), exc)(scope, receive, send)
                return
            if message["type"] == "http.disconnect":
                return  # the client is gone: nobody to answer
            body += message.get("body", b"")
            if len(body) > cap:
                await _answer(_too_large(None, cap), scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        if body and _is_json(content_type):
            error = _check_json_body(bytes(body))
            if error is not None:
                await _answer(error, scope, receive, send)
                return
        await self.app(scope, _replay(bytes(body), receive), send)

    def _streams_upload(self, scope: Scope, content_type: str | None) -> bool:
        if content_type is None or not content_type.lower().startswith("multipart/form-data"):
            return False
        # Included routers are resolved lazily: iter_route_contexts yields their routes
        # with the prefix they are served under.
        for context in iter_route_contexts(self.router.routes):
            route = context.original_route
            if not isinstance(route, APIRoute) or not self._documents_multipart(route):
                continue
            match, _ = context.matches(scope)
            if match is Match.FULL:
                return True
        return False

    def _documents_multipart(self, route: APIRoute) -> bool:
        known = self._streams.get(id(route))
        if known is None:
            body = (route.openapi_extra or {}).get("requestBody", {})
            known = "multipart/form-data" in body.get("content", {})
            self._streams[id(route)] = known
        return known


def _check_json_body(body: bytes) -> AgoraError | None:
    try:
        doc = json.loads(body, parse_constant=reject_json_constant, parse_float=_finite_float)
    except NotJSONNumber as exc:
        return BadRequest(str(exc), code="invalid_json")
    except RecursionError:
        return BadRequest(
            f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels", code="json_too_deep"
        )
    except ValueError:
        return None  # not JSON at all (or not UTF-8): the route answers its usual 400
    return _json_text_error(doc, "$")


def _too_large(declared: int | None, cap: int) -> PayloadTooLarge:
    size = f"of {declared} bytes " if declared is not None else ""
    return PayloadTooLarge(
        f"the request body {size}exceeds the limit of {cap} bytes (AGORA_MAX_JSON_BODY_BYTES)",
        code="request_too_large",
    )


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body, whole, as the first message; then the client's own (its disconnect)."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _answer(error: AgoraError, scope: Scope, receive: Receive, send: Send) -> None:
    response = problem_response(error.problem(instance=scope["path"]), error.status)
    await response(scope, receive, send)
