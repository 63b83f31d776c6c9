"""Idempotency-Key handling for POSTs: the first outcome is stored and replayed.

A key belongs to the token that sent it. The same key with the same request content
replays the stored response; with different content it is refused (409), as Stripe does.
Only successful outcomes are stored, so a request that failed can be retried as is.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete
from sqlalchemy.orm import Session

from registry.db.models import IdempotencyKey, utcnow
from registry.errors import BadRequest, Conflict

MAX_KEY_LENGTH = 200


@dataclass(frozen=True)
class StoredResponse:
    status_code: int
    body: dict[str, Any]


def check_key(key: str) -> str:
    key = key.strip()
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise BadRequest(
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable characters",
            code="invalid_idempotency_key",
        )
    return key


def lookup(
    *, session: Session, token_id: int, key: str, method: str, path: str, fingerprint: str
) -> StoredResponse | None:
    row = session.get(IdempotencyKey, (token_id, key))
    if row is None:
        return None
    if row.fingerprint != fingerprint or row.method != method or row.path != path:
        raise Conflict(
            "this Idempotency-Key was already used for a different request; "
            "use a new key for a new request",
            code="idempotency_key_reused",
        )
    return StoredResponse(status_code=row.status_code, body=row.response_body)


def remember(
    *,
    session: Session,
    token_id: int,
    key: str,
    method: str,
    path: str,
    fingerprint: str,
    response: StoredResponse,
) -> None:
    session.add(
        IdempotencyKey(
            token_id=token_id,
            key=key,
            method=method,
            path=path,
            fingerprint=fingerprint,
            status_code=response.status_code,
            response_body=response.body,
        )
    )
    session.flush()


def prune(*, session: Session, older_than: dt.timedelta, now: dt.datetime | None = None) -> int:
    """Forget keys older than ``older_than``; returns how many were removed."""
    cutoff = (now or utcnow()) - older_than
    result = session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < cutoff))
    return int(getattr(result, "rowcount", 0) or 0)
