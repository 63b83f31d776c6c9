"""Bearer tokens: ``agora_<random>``, shown once, stored as a sha256 hash."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.db.models import Token, utcnow
from registry.errors import BadRequest, NotFound

ROLES = ("contributor", "moderator", "admin", "worker")
TOKEN_PREFIX = "agora_"  # noqa: S105 (a public prefix, not a secret)


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
    *, session: Session, name: str, role: str, trusted: bool = False
) -> tuple[Token, str]:
    """Create a token; returns the row and the secret (the only time it exists in clear).
    ``trusted`` marks a worker token whose outputs the operator vouches for."""
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
    return token, secret


def list_tokens(*, session: Session) -> list[Token]:
    return list(session.scalars(select(Token).order_by(Token.id)))


def revoke_token(*, session: Session, token_id: int) -> Token:
    """Revoke a token at once: the next request that presents it is a 401."""
    token = session.get(Token, token_id)
    if token is None:
        raise NotFound(f"no token #{token_id}", code="token_not_found")
    if token.revoked_at is None:
        token.revoked_at = utcnow()
    session.flush()
    return token


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
