"""FastAPI dependencies: the runtime, a session per request, and bearer-token auth.

Sessions and transactions, one pattern for every route:

* A request has one database session, ``SessionDep`` (the bearer-token check shares it).
  Nothing else in ``registry.api`` opens a session.
* A route that reads wraps its service reads and the view it builds in one
  ``with session.begin():`` block: the transaction (and its pooled connection) ends
  before the response is sent, even a streamed download.
* A route that writes hands the session to one service function, which owns the
  transaction boundaries: a write sequence validates, commits blobs outside any
  transaction, then records its rows (with the Idempotency-Key's outcome) in one
  transaction (``registry.services``: ``experts.submit_expert``,
  ``base_models.upload_base_model``, ``moderation.moderate``, ``requests``, ``leases``,
  ``completion``). Routes never begin a transaction for a write, nor commit.

The functions those sequences are made of (``experts.record_version``, ``jobs.lease``...)
take the caller's session and never commit.

Credentials, one rule for every route: ``optional_principal`` is an app-wide dependency
(``create_app`` passes it to ``FastAPI(dependencies=...)``), so an ``Authorization`` header
that is sent and fails (not ``Bearer <token>``, an unknown or a revoked token) is a 401
``invalid_authorization`` / ``invalid_token`` on every route, public reads and probes
included, before the route runs. A route that needs the principal depends on
``optional_principal`` too (``OptionalPrincipal``, ``require_roles``): FastAPI solves one
dependency once per request, so the token is looked up once. Without the header nothing is
looked up. The lookup has its own short session (its transaction ends before the route's
begins), so a route that needs no database opens none for an anonymous caller.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from registry.errors import Forbidden, Unauthenticated
from registry.runtime import Runtime
from registry.services.tokens import Principal, authenticate


async def get_runtime(request: Request) -> Runtime:
    # async: an attribute read, solved on the event loop rather than in a worker thread.
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None:
        # Only reachable when a test drives the ASGI app without its lifespan.
        raise RuntimeError(
            "the app's lifespan has not run; use `with TestClient(app)` or an ASGI server"
        )
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_session(runtime: RuntimeDep) -> Iterator[Session]:
    with runtime.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def _lookup(runtime: Runtime, secret: str) -> Principal | None:
    with runtime.sessions() as session, session.begin():
        return authenticate(session=session, secret=secret)


async def optional_principal(request: Request, runtime: RuntimeDep) -> Principal | None:
    """The caller's identity, None without an ``Authorization`` header; a header that fails
    is always a 401 (a client that sent credentials wants to know they failed, not to be
    served anonymously)."""
    headers = request.headers.getlist("authorization")
    if not headers:
        return None
    if len(headers) > 1:
        raise Unauthenticated("send one Authorization header", code="invalid_authorization")
    scheme, _, secret = headers[0].partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        raise Unauthenticated(
            "Authorization must be `Bearer <token>`", code="invalid_authorization"
        )
    principal = await run_in_threadpool(_lookup, runtime, secret)
    if principal is None:
        raise Unauthenticated("unknown or revoked token", code="invalid_token")
    # The proof the rate limiter charges a credential to its own bucket by (api/limits.py).
    request.state.principal = principal
    return principal


OptionalPrincipal = Annotated[Principal | None, Depends(optional_principal)]


class RoleRequirement:
    """The dependency ``require_roles`` makes: the principal, or 401 without a token and
    403 for another role. A class so the OpenAPI document can tell which operations need
    which roles (registry/api/openapi.py)."""

    def __init__(self, roles: tuple[str, ...]) -> None:
        self.roles = roles

    async def __call__(self, principal: OptionalPrincipal) -> Principal:
        if principal is None:
            raise Unauthenticated("this endpoint needs a bearer token", code="missing_token")
        if principal.role not in self.roles:
            raise Forbidden(
                f"role {principal.role!r} may not do this; it needs one of {', '.join(self.roles)}",
                code="insufficient_role",
            )
        return principal


def require_roles(*roles: str) -> RoleRequirement:
    return RoleRequirement(roles)
