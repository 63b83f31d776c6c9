"""Bearer tokens: ``agora_<random>``, shown once, stored as a sha256 hash.

Making and revoking a token are governance actions: each appends an entry to the audit
log (registry/services/audit.py) in the caller's transaction, whoever calls it (the
tokens API, ``agora admin``, ``agora serve`` for its embedded worker). ``issue`` and
``revoke`` are the write sequences of ``POST /v1/tokens`` and ``DELETE /v1/tokens/{id}``
and own their transactions; the other functions take the caller's session and never
commit.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.db.models import Token, utcnow
from registry.errors import BadRequest, NotFound
from registry.services import audit

ROLES = ("contributor", "moderator", "admin", "worker")
TOKEN_PREFIX = "agora_"  # noqa: S105 (a public prefix, not a secret)
# Who made or revoked a token when the caller does not say (a script on the database).
OPERATOR = "operator"
CREATE_ACTION = "token.create"
REVOKE_ACTION = "token.revoke"
MAX_REASON_CHARS = 2000


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: the token's name is the identity that owns experts."""

    token_id: int
    name: str
    role: str
    # A worker token suspended for refused results (registry/services/workers.py): refused
    # on every worker route, still authenticated elsewhere.
    suspended: bool = False
    # A worker token whose outputs the operator vouches for (``agora admin create-token
    # --trusted``; the embedded worker of ``agora serve``).
    trusted: bool = False

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def hash_token(secret: str) -> str:
    # A plain sha256 suffices: the secret has 256 bits of entropy, so there is nothing for a
    # slow password hash to protect against, and lookups stay a single indexed equality.
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def create_token(
    *,
    session: Session,
    name: str,
    role: str,
    trusted: bool = False,
    actor: str = OPERATOR,
    actor_token: int | None = None,
    reason: str = "",
) -> tuple[Token, str]:
    """Create a token, audited; returns the row and the secret (the only time it exists
    in clear; the audit entry holds its prefix, never the secret). ``trusted`` marks a
    worker token whose outputs the operator vouches for. ``actor`` (and ``actor_token``,
    the token it acted with) is who made it."""
    if role not in ROLES:
        raise BadRequest(f"unknown role {role!r}; one of {', '.join(ROLES)}", code="unknown_role")
    name = name.strip()
    if not name or len(name) > 100:
        raise BadRequest("a token name is 1 to 100 characters", code="invalid_name")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = Token(
        name=name,
        role=role,
        prefix=secret[: len(TOKEN_PREFIX) + 6],
        token_hash=hash_token(secret),
        trusted=trusted,
        refusals=0,
    )
    session.add(token)
    session.flush()
    audit.append(
        session,
        actor=actor,
        action=CREATE_ACTION,
        target=f"token:{token.id}",
        reason=reason[:MAX_REASON_CHARS],
        detail=_detail(token, actor_token),
    )
    return token, secret


def list_tokens(*, session: Session) -> list[Token]:
    return list(session.scalars(select(Token).order_by(Token.id)))


def revoke_token(
    *,
    session: Session,
    token_id: int,
    actor: str = OPERATOR,
    actor_token: int | None = None,
    reason: str = "",
) -> Token:
    """Revoke a token at once: the next request that presents it is a 401. Audited the
    first time; revoking a revoked token changes nothing and records nothing."""
    # Row lock on PostgreSQL: two concurrent revocations record one entry.
    token = session.get(Token, token_id, with_for_update=True, populate_existing=True)
    if token is None:
        raise NotFound(f"no token #{token_id}", code="token_not_found")
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        session.flush()
        audit.append(
            session,
            actor=actor,
            action=REVOKE_ACTION,
            target=f"token:{token.id}",
            reason=reason[:MAX_REASON_CHARS],
            detail=_detail(token, actor_token),
        )
    return token


def _detail(token: Token, actor_token: int | None) -> dict[str, Any]:
    detail: dict[str, Any] = {
        "name": token.name,
        "role": token.role,
        "trusted": token.trusted,
        "prefix": token.prefix,
    }
    if actor_token is not None:
        detail["actor_token"] = actor_token
    return detail


def issue(
    *,
    session: Session,
    principal: Principal,
    name: str,
    role: str,
    trusted: bool,
    reason: str | None,
) -> tuple[dict[str, Any], str]:
    """``POST /v1/tokens``: make a token in one transaction, audited with the admin who
    asked; returns its view and the secret."""
    with session.begin():
        token, secret = create_token(
            session=session,
            name=name,
            role=role,
            trusted=trusted,
            actor=principal.name,
            actor_token=principal.token_id,
            reason=(reason or "").strip(),
        )
        return token_view(token), secret


def revoke(
    *, session: Session, principal: Principal, token_id: int, reason: str | None
) -> dict[str, Any]:
    """``DELETE /v1/tokens/{id}``: revoke in one transaction, audited the first time."""
    with session.begin():
        token = revoke_token(
            session=session,
            token_id=token_id,
            actor=principal.name,
            actor_token=principal.token_id,
            reason=(reason or "").strip(),
        )
        return token_view(token)


def token_view(token: Token) -> dict[str, Any]:
    """A token as the API lists it: never its secret nor the secret's hash."""

    def when(value: Any) -> str | None:
        return None if value is None else value.isoformat()

    return {
        "id": token.id,
        "name": token.name,
        "role": token.role,
        "trusted": token.trusted,
        "prefix": token.prefix,
        "created_at": when(token.created_at),
        "revoked_at": when(token.revoked_at),
        "suspended_at": when(token.suspended_at),
    }


def authenticate(*, session: Session, secret: str) -> Principal | None:
    """The principal a secret stands for, or None. The secret is never compared: its hash
    is looked up (an indexed equality on a value an attacker cannot steer byte by byte),
    then checked again with ``hmac.compare_digest``."""
    if not secret.startswith(TOKEN_PREFIX):
        return None
    digest = hash_token(secret)
    token = session.scalars(
        select(Token).where(Token.token_hash == digest, Token.revoked_at.is_(None))
    ).one_or_none()
    if token is None or not hmac.compare_digest(token.token_hash, digest):
        return None
    return Principal(
        token_id=token.id,
        name=token.name,
        role=token.role,
        suspended=token.suspended_at is not None,
        trusted=token.trusted,
    )
