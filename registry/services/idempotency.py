"""Idempotency-Key handling for POSTs: the first outcome is stored and replayed.

A key belongs to the token that sent it. The same key with the same request content
replays the stored response; with different content it is refused (409), as Stripe does.
Only successful outcomes are stored, so a request that failed can be retried as is.

``IdempotentRequest`` binds one POST's key to its token and content; the write sequences
(registry/services/*) look it up before doing any work and store the outcome in the very
transaction that writes the rows.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from registry.db.models import IdempotencyKey, utcnow
from registry.errors import BadRequest, Conflict
from registry.services.tokens import Principal

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


class IdempotentRequest:
    """The Idempotency-Key of one POST, if it carried one, bound to its token and content."""

    def __init__(
        self, *, principal: Principal, key: str | None, method: str, path: str, fingerprint: str
    ) -> None:
        self.principal = principal
        self.key = check_key(key) if key is not None else None
        self.method = method
        self.path = path
        self.fingerprint = fingerprint

    def replay(self, session: Session) -> StoredResponse | None:
        """The stored outcome of this key (in a transaction of its own), None if new."""
        if self.key is None:
            return None
        with session.begin():
            return lookup(
                session=session,
                token_id=self.principal.token_id,
                key=self.key,
                method=self.method,
                path=self.path,
                fingerprint=self.fingerprint,
            )

    def commit_or_replay(
        self, session: Session, write: Callable[[Session], StoredResponse]
    ) -> StoredResponse:
        """Run ``write`` in a transaction that also stores the key; if a concurrent request
        with the same key won the race, answer what it stored (or 409 if it differed)."""
        try:
            with session.begin():
                response = write(session)
                if self.key is not None:
                    remember(
                        session=session,
                        token_id=self.principal.token_id,
                        key=self.key,
                        method=self.method,
                        path=self.path,
                        fingerprint=self.fingerprint,
                        response=response,
                    )
            return response
        except IntegrityError:
            if self.key is None:
                raise
            stored = self.replay(session)
            if stored is None:
                raise
            return stored
