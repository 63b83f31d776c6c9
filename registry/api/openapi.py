"""The OpenAPI document, made to tell the truth, and the methods each path answers.

FastAPI derives the operations, parameters, bodies and success responses from the routes.
This module completes the document in one place (``install_openapi``):

* Every problem response is ``application/problem+json`` with the ``Problem`` schema
  (registry/api/problems.py writes every error that way).
* FastAPI's own 422 "Validation Error" is dropped: request validation is a 400
  ``invalid_request`` here. A 422 is documented only where a route declares it (artifact
  validation).
* The problems an operation can return because of what it depends on are added from the
  route itself, by this table:

  ======  ===========================================  ===============================
  status  documented on                                codes
  ======  ===========================================  ===============================
  400     every operation (registry/api/hygiene.py);   ``invalid_characters``;
          those with a parameter or a body             ``invalid_request``, ...
  401     every operation (a credential that is sent   ``invalid_token``,
          and fails: registry/api/deps.py)             ``invalid_authorization``;
                                                       ``missing_token`` if it needs a role
  403     operations that need a role                  ``insufficient_role``
  404     operations with a path parameter             one ``*_not_found`` per kind
  408     operations with a body                       ``request_timeout`` (a slow body)
  409     operations with an ``Idempotency-Key``       ``idempotency_key_reused``
  413     operations with a body                       the body or a part is too large
  429     every operation but the probes               ``rate_limited``
          (registry/api/limits.py)
  503     every operation                              ``database_unavailable``
  ======  ===========================================  ===============================

* What only the route knows (a 451 for a disabled expert, a 409 for a stale lease, a 422
  for an artifact that fails validation, a 415 for a multipart endpoint...) it declares
  next to itself, with ``responses=problems({status: "codes"})``.
* Bearer authentication is a security scheme: ``security`` names it as required on the
  operations that need a role and as optional on the others.

``tests/adversarial/test_schemathesis.py`` runs Schemathesis against the app: a route that
answers a status its entry does not list fails it.

``install_methods`` makes ``OPTIONS`` answer, on every path the app routes, 204 with an
``Allow`` that lists every method of every route of that path (plus OPTIONS), and gives a
405 for a method a path does not have the same ``Allow``. A path no route matches stays a
404.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute, RouteContext, iter_route_contexts
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from registry.api.deps import RoleRequirement
from registry.api.limits import EXEMPT_PATHS
from registry.api.problems import PROBLEM_JSON, http_problem
from registry.protocol.refs import NOT_BLANK
from registry.services.idempotency import MAX_KEY_LENGTH

OPENAPI_URL = "/openapi.json"
BEARER_SCHEME = "bearerAuth"
IDEMPOTENCY_HEADER = "idempotency-key"
_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
BINARY: dict[str, Any] = {"type": "string", "format": "binary"}


class Problem(BaseModel):
    """An RFC 9457 problem: every 4xx and 5xx answer of the registry."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="https://agora.dev/problems/<code with dashes>")
    title: str
    status: int = Field(description="the HTTP status, repeated")
    detail: str = Field(description="what went wrong, for a human")
    code: str = Field(description="stable, snake_case: what clients switch on")
    instance: str | None = Field(default=None, description="the request's path")
    errors: list[dict[str, Any]] | None = Field(
        default=None, description="field-level problems, where there are several"
    )


_TITLES = {
    400: "Bad request",
    401: "Authentication failed",
    403: "Forbidden",
    404: "Not found",
    408: "Request timeout",
    409: "Conflict",
    413: "Payload too large",
    415: "Unsupported media type",
    416: "Range not satisfiable",
    422: "Validation failed",
    429: "Too many requests",
    451: "Unavailable for legal reasons",
    503: "Service unavailable",
}


def problems(codes: Mapping[int, str]) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: the problems only it can return, each status with the
    codes it carries, e.g. ``problems({451: "expert_disabled"})``. The body is filled in
    by ``install_openapi`` (``Problem``, as problem+json)."""
    return {
        status: {"description": f"{_TITLES.get(status, 'Problem')}: {text}"}
        for status, text in codes.items()
    }


def download_responses(
    media_types: Mapping[str, dict[str, Any]],
    *,
    head: bool,
    extra_headers: Mapping[str, str] = {},
) -> dict[int | str, dict[str, Any]]:
    """``responses=`` of a blob download (GET) or of its HEAD: 200 or 206 with the range
    and digest headers, 416 outside the blob (registry/api/downloads.py). ``media_types``
    maps each type the route may serve to the schema of a whole file of it; a 206 carries a
    byte range of the file, which is no longer a JSON document."""
    headers: dict[str, Any] = {
        "Accept-Ranges": _header("always `bytes`"),
        "Content-Length": _header("bytes in this response", schema={"type": "integer"}),
        "ETag": _header("the quoted sha256 of the whole blob: it never changes"),
        "X-Agora-Digest": _header(
            "sha256:<hex> of the whole blob", schema={"type": "string", "pattern": "^sha256:"}
        ),
        **{name: _header(text) for name, text in extra_headers.items()},
    }
    whole = {mt: {} if head else {"schema": schema} for mt, schema in media_types.items()}
    part = {mt: {} if head or "json" in mt else {"schema": BINARY} for mt in media_types}
    what = "headers only" if head else "the bytes"
    return {
        200: {"description": f"the whole blob ({what})", "headers": headers, "content": whole},
        206: {
            "description": f"the requested range (`Range: bytes=a-b`, `a-`, `-n`; {what})",
            "headers": {
                **headers,
                "Content-Range": _header("bytes START-END/SIZE", schema={"type": "string"}),
            },
            "content": part,
        },
        **problems({416: "range_not_satisfiable (with Content-Range: bytes */SIZE)"}),
    }


def _header(description: str, *, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "description": description,
        "required": True,
        "schema": schema if schema is not None else {"type": "string"},
    }


# -- the document ------------------------------------------------------------------------


def install_openapi(app: FastAPI) -> None:
    """Serve the completed document at ``/openapi.json`` (built once, on first use) as a
    route of the app, so the app-wide credential check applies to it like to every route.
    The app is created with ``openapi_url=None``; ``app.openapi_url`` is set here for
    /docs."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.openapi_url = OPENAPI_URL

    @app.get(OPENAPI_URL, include_in_schema=False)
    def openapi_document() -> JSONResponse:
        return JSONResponse(app.openapi())


def build_openapi(app: FastAPI) -> dict[str, Any]:
    # A copy: FastAPI's document shares dicts with the routes' responses= and openapi_extra.
    schema = copy.deepcopy(
        get_openapi(
            title=app.title,
            version=app.version,
            openapi_version=app.openapi_version,
            description=app.description,
            routes=app.routes,
        )
    )
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    components["securitySchemes"] = {
        BEARER_SCHEME: {
            "type": "http",
            "scheme": "bearer",
            "description": "agora_... (`agora admin create-token --role ROLE --name NAME`); "
            "sent and unknown, revoked or malformed, it is a 401 on every operation",
        }
    }
    for route in api_routes(app.routes):
        if not route.include_in_schema:
            continue
        for method in sorted(route.methods or ()):
            operation = schema["paths"][route.path_format][method.lower()]
            _complete(operation, route)
    for name in ("HTTPValidationError", "ValidationError"):
        if not _refers_to(schema["paths"], f"#/components/schemas/{name}"):
            schemas.pop(name, None)
    return schema


def api_routes(routes: Sequence[BaseRoute]) -> Iterator[RouteContext]:
    """The API routes of ``routes`` as the app serves them: routes of included routers
    with their prefix and the app's dependencies (FastAPI resolves inclusions lazily, so
    ``app.routes`` itself holds the routers)."""
    for context in iter_route_contexts(routes):
        if isinstance(context.original_route, APIRoute):
            yield context


def _complete(operation: dict[str, Any], route: RouteContext) -> None:
    responses: dict[str, Any] = operation["responses"]
    declared = {int(status) for status in route.responses if str(status).isdigit()}
    if 422 not in declared:
        responses.pop("422", None)
    roles = _roles(route.dependant)
    has_body = route.body_field is not None or "requestBody" in (route.openapi_extra or {})
    has_params = has_body or bool(operation.get("parameters"))
    header_names = {
        p["name"].lower() for p in operation.get("parameters", ()) if p["in"] == "header"
    }
    path_params = any(p["in"] == "path" for p in operation.get("parameters", ()))

    if roles is None:
        operation["security"] = [{}, {BEARER_SCHEME: []}]
        _add(responses, 401, "invalid_token, invalid_authorization (a credential that fails)")
    else:
        operation["security"] = [{BEARER_SCHEME: []}]
        _add(
            responses,
            401,
            "missing_token (this operation needs a token), invalid_token, invalid_authorization",
        )
        _add(responses, 403, f"insufficient_role (it needs {' or '.join(roles)})")
    _add(responses, 400, "invalid_characters (a NUL in the path, query or a header)")
    if has_params:
        _add(responses, 400, "invalid_request (a parameter or the body, with `errors`)")
    if path_params:
        _add(responses, 404, "what the path names does not exist")
    if IDEMPOTENCY_HEADER in header_names:
        _describe_idempotency_key(operation)
        _add(responses, 400, "invalid_idempotency_key")
        _add(responses, 409, "idempotency_key_reused (the key came with other content)")
    if has_body:
        _forbid_unknown_form_fields(operation)
        _add(responses, 408, "request_timeout (the body came too slowly)")
        _add(responses, 413, "the body, or a part of it, is over its limit")
    if route.path_format not in EXEMPT_PATHS:
        _add(responses, 429, "rate_limited (with Retry-After)")
    _add(responses, 503, "database_unavailable, or another dependency down: retry shortly")

    for status, response in responses.items():
        if status.isdigit() and int(status) >= 400:
            response["content"] = {PROBLEM_JSON: {"schema": dict(_PROBLEM_REF)}}
            response.setdefault("headers", {}).update(_PROBLEM_HEADERS.get(int(status), {}))
            if not response["headers"]:
                del response["headers"]


_PROBLEM_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": _header('Bearer realm="agora"')},
    416: {"Content-Range": _header("bytes */SIZE")},
    429: {"Retry-After": _header("seconds to wait", schema={"type": "integer"})},
}


def _describe_idempotency_key(operation: dict[str, Any]) -> None:
    """The key's rule (registry/services/idempotency.py ``check_key``), stated as the
    printable ASCII subset of it, without edge spaces (a header loses them anyway)."""
    for parameter in operation["parameters"]:
        if parameter["in"] == "header" and parameter["name"].lower() == IDEMPOTENCY_HEADER:
            parameter["description"] = (
                "replays the stored response of the same request; other content with the "
                "same key is a 409"
            )
            parameter["schema"] = {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_KEY_LENGTH,
                "pattern": "^[!-~]([ -~]*[!-~])?$",
            }


def _forbid_unknown_form_fields(operation: dict[str, Any]) -> None:
    """registry/api/uploads.py refuses a form field its route does not take (400
    ``unexpected_field``): every multipart body says so."""
    content = operation.get("requestBody", {}).get("content", {})
    form = content.get("multipart/form-data", {}).get("schema")
    if form is not None:
        form["additionalProperties"] = False


def _add(responses: dict[str, Any], status: int, codes: str) -> None:
    entry = responses.setdefault(str(status), {"description": f"{_TITLES[status]}: {codes}"})
    if codes not in entry["description"]:
        entry["description"] = f"{entry['description']}; {codes}"


def _roles(dependant: Dependant) -> tuple[str, ...] | None:
    """The roles a route requires (``require_roles`` anywhere in its dependencies)."""
    for sub in dependant.dependencies:
        if isinstance(sub.call, RoleRequirement):
            return sub.call.roles
        found = _roles(sub)
        if found is not None:
            return found
    return None


def _refers_to(node: Any, ref: str) -> bool:
    if isinstance(node, dict):
        return node.get("$ref") == ref or any(_refers_to(v, ref) for v in node.values())
    if isinstance(node, list):
        return any(_refers_to(v, ref) for v in node)
    return False


# -- OPTIONS and 405 ---------------------------------------------------------------------


def allowed_methods(request: Request) -> list[str]:
    """The methods of the resource at the request's path, plus OPTIONS; empty when no route
    matches the path. The resource is the most specific path template that matches (a
    literal ``/v1/jobs/lease`` before ``/v1/jobs/{job_id}``), as the document lists it:
    ``Allow`` names every method of every route with that template."""
    scope = {
        "type": "http",
        "path": request.scope["path"],
        "root_path": request.scope.get("root_path", ""),
        "method": "OPTIONS",
    }
    matching = [
        route
        for route in api_routes(request.app.routes)
        if route.methods and route.matches(scope)[0] != Match.NONE
    ]
    if not matching:
        return []
    template = min(matching, key=lambda route: len(route.param_convertors)).path_format
    methods = {
        method
        for route in matching
        if route.path_format == template
        for method in route.methods or ()
    }
    return sorted(methods | {"OPTIONS"})


def install_methods(app: FastAPI) -> None:
    """OPTIONS on every routed path and the right ``Allow`` on a 405; call after every
    route is added."""
    paths = list(dict.fromkeys(str(r.path) for r in api_routes(app.routes)))

    def options(request: Request) -> Response:
        allow = ", ".join(allowed_methods(request))
        return Response(status_code=204, headers={"Allow": allow})

    for path in paths:
        app.add_api_route(path, options, methods=["OPTIONS"], include_in_schema=False)

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        allow = allowed_methods(request)
        # Not an API route (Swagger UI's static files, which answer GET and HEAD only): the
        # Allow that route gave stands.
        headers = {**(exc.headers or {}), "Allow": ", ".join(allow)} if allow else exc.headers
        return http_problem(
            request, StarletteHTTPException(exc.status_code, exc.detail, headers=headers)
        )

    app.add_exception_handler(405, method_not_allowed)


__all__ = [
    "BINARY",
    "NOT_BLANK",
    "OPENAPI_URL",
    "PROBLEM_JSON",
    "Problem",
    "allowed_methods",
    "build_openapi",
    "download_responses",
    "install_methods",
    "install_openapi",
    "problems",
]
