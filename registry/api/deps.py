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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from registry.errors import Forbidden, Unauthenticated
from registry.runtime import Runtime
from registry.services.tokens import Principal, authenticate


def get_runtime(request: Request) -> Runtime:
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


def optional_principal(request: Request, session: SessionDep) -> Principal | None:
    """The caller's identity, None without a token; a bad token is always a 401 (a client
    that sent credentials wants to know they failed, not to be served anonymously)."""
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthenticated(
            "Authorization must be `Bearer <token>`", code="invalid_authorization"
        )
    with session.begin():
        principal = authenticate(session=session, secret=secret.strip())
    if principal is None:
        raise Unauthenticated("unknown or revoked token", code="invalid_token")
    return principal


OptionalPrincipal = Annotated[Principal | None, Depends(optional_principal)]


def require_roles(*roles: str) -> Callable[[Principal | None], Principal]:
    def dependency(principal: OptionalPrincipal) -> Principal:
        if principal is None:
            raise Unauthenticated("this endpoint needs a bearer token", code="missing_token")
        if principal.role not in roles:
            raise Forbidden(
                f"role {principal.role!r} may not do this; it needs one of {', '.join(roles)}",
                code="insufficient_role",
            )
        return principal

    return dependency
