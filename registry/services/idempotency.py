"""Idempotency-Key handling for POSTs: the first outcome is stored and replayed.

A key belongs to the token that sent it. The same key with the same request content
replays the stored response; with different content it is refused (409
``idempotency_key_reused``), as Stripe does. Only successful outcomes are stored, so a
request that failed can be retried as is.

A key is *reserved* before any work is done, in a short transaction of its own: a row
with status 0 (``PENDING``) and the request's method, path and fingerprint. While it is
held, a request with the same key and other content is refused at once (409
``idempotency_key_reused``), so it never commits a blob; one with the same content waits
for the holder's outcome and replays it (or, past ``WAIT_SECONDS``, gets 409
``request_in_progress`` with ``Retry-After``). The holder turns its reservation into the
stored response in the very transaction that writes its rows; if it fails, the
reservation is deleted; if its process died, the reservation expires after
``reservation_seconds`` (``AGORA_IDEMPOTENCY_RESERVATION_SECONDS``) and the next request
with the key takes it over.

``IdempotentRequest`` binds one POST's key to its token and content; a write sequence
(registry/services/*) is decorated with ``@reserves_key``, which reserves the key on
entry (answering a stored outcome without calling the sequence) and releases it when the
sequence fails, and stores its outcome with ``commit_or_replay``.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ParamSpec

from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from registry.db.models import IdempotencyKey, utcnow
from registry.errors import BadRequest, Conflict
from registry.services.tokens import Principal

MAX_KEY_LENGTH = 200
# The status code of a reservation: no HTTP response has status 0.
PENDING = 0
# A request with the same key and content as one in flight waits this long for its
# outcome before answering 409 request_in_progress.
WAIT_SECONDS = 10.0
_POLL_SECONDS = (0.05, 0.1, 0.2, 0.5)
RETRY_AFTER_SECONDS = 2
DEFAULT_RESERVATION_SECONDS = 15 * 60

log = logging.getLogger("registry.idempotency")
P = ParamSpec("P")


@dataclass(frozen=True)
class StoredResponse:
    status_code: int
    body: dict[str, Any]


class RequestInProgress(Conflict):
    """409 with Retry-After: a request with this key and this content is still running."""

    def __init__(self) -> None:
        super().__init__(
            "a request with this Idempotency-Key and this content is still being processed; "
            "retry shortly to get its outcome",
            code="request_in_progress",
        )
        self.headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}


def key_reused() -> Conflict:
    return Conflict(
        "this Idempotency-Key was already used for a different request; "
        "use a new key for a new request",
        code="idempotency_key_reused",
    )


def check_key(key: str) -> str:
    key = key.strip()
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise BadRequest(
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable characters",
            code="invalid_idempotency_key",
        )
    return key


def prune(*, session: Session, older_than: dt.timedelta, now: dt.datetime | None = None) -> int:
    """Forget keys (and dead reservations) older than ``older_than``; returns how many."""
    cutoff = (now or utcnow()) - older_than
    result = session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < cutoff))
    return int(getattr(result, "rowcount", 0) or 0)


class IdempotentRequest:
    """The Idempotency-Key of one POST, if it carried one, bound to its token and content."""

    def __init__(
        self,
        *,
        principal: Principal,
        key: str | None,
        method: str,
        path: str,
        fingerprint: str,
        reservation_seconds: float = DEFAULT_RESERVATION_SECONDS,
    ) -> None:
        self.principal = principal
        self.key = check_key(key) if key is not None else None
        self.method = method
        self.path = path
        self.fingerprint = fingerprint
        self.reservation = dt.timedelta(seconds=reservation_seconds)
        # The reservation this request holds: its row's created_at, None when it holds none.
        self._stamp: dt.datetime | None = None
        self._stored = False

    @property
    def held(self) -> bool:
        return self._stamp is not None and not self._stored

    def _row_filter(self) -> Any:
        return (IdempotencyKey.token_id == self.principal.token_id) & (
            IdempotencyKey.key == self.key
        )

    def _same_request(self, row: IdempotencyKey) -> bool:
        return (
            row.fingerprint == self.fingerprint
            and row.method == self.method
            and row.path == self.path
        )

    def reserve(self, session: Session) -> StoredResponse | None:
        """Reserve the key for this request, in short transactions of its own: None once it
        holds it, or the stored outcome to answer instead. 409 ``idempotency_key_reused``
        if the key is held or stored for other content; 409 ``request_in_progress`` if the
        same request is still running after ``WAIT_SECONDS``."""
        if self.key is None or self._stamp is not None:
            return None
        deadline = time.monotonic() + WAIT_SECONDS
        polls = 0
        while True:
            try:
                with session.begin():
                    now = utcnow()
                    reserved, stored = self._try_reserve(session, now)
            except IntegrityError:
                # A concurrent request reserved the key first: judge its row next time.
                reserved, stored = False, None
            if reserved:
                self._stamp = now
                return None
            if stored is not None:
                return stored
            if time.monotonic() >= deadline:
                raise RequestInProgress()
            time.sleep(_POLL_SECONDS[min(polls, len(_POLL_SECONDS) - 1)])
            polls += 1

    def _try_reserve(
        self, session: Session, now: dt.datetime
    ) -> tuple[bool, StoredResponse | None]:
        """One look at the key's row, in the caller's transaction: (reserved now, stored
        outcome to answer); (False, None) while the same request holds it."""
        row = session.get(
            IdempotencyKey, (self.principal.token_id, self.key), populate_existing=True
        )
        if row is None:
            session.add(self._reservation(now))
            session.flush()
            return True, None
        if row.status_code != PENDING:
            if not self._same_request(row):
                raise key_reused()
            return False, StoredResponse(row.status_code, row.response_body)
        if now - row.created_at >= self.reservation:
            # Its holder died (a crash) long ago: take the key over.
            return self._take_over(session, stale=row.created_at, now=now), None
        if not self._same_request(row):
            raise key_reused()
        return False, None

    def _reservation(self, now: dt.datetime) -> IdempotencyKey:
        assert self.key is not None
        return IdempotencyKey(
            token_id=self.principal.token_id,
            key=self.key,
            method=self.method,
            path=self.path,
            fingerprint=self.fingerprint,
            status_code=PENDING,
            response_body={},
            created_at=now,
        )

    def _take_over(self, session: Session, *, stale: dt.datetime, now: dt.datetime) -> bool:
        result = session.execute(
            update(IdempotencyKey)
            .where(
                self._row_filter(),
                IdempotencyKey.status_code == PENDING,
                IdempotencyKey.created_at == stale,
            )
            .values(
                method=self.method, path=self.path, fingerprint=self.fingerprint, created_at=now
            )
            .execution_options(synchronize_session=False)
        )
        return int(getattr(result, "rowcount", 0) or 0) == 1

    def _store(self, session: Session, response: StoredResponse) -> None:
        """Turn this request's reservation into its stored outcome (inside the caller's
        transaction); 409 request_in_progress if the reservation was taken over."""
        result = session.execute(
            update(IdempotencyKey)
            .where(
                self._row_filter(),
                IdempotencyKey.status_code == PENDING,
                IdempotencyKey.created_at == self._stamp,
            )
            .values(
                status_code=response.status_code,
                response_body=response.body,
                created_at=utcnow(),
            )
            .execution_options(synchronize_session=False)
        )
        if int(getattr(result, "rowcount", 0) or 0) != 1:
            # Held longer than reservation_seconds and taken over by a retry: that one
            # answers; this transaction rolls back.
            raise RequestInProgress()

    def release(self, session: Session) -> None:
        """Delete this request's reservation (it failed, or stores nothing); a no-op when it
        holds none. A database that fails here leaves the reservation to expire."""
        if not self.held:
            return
        stamp, self._stamp = self._stamp, None
        try:
            if session.in_transaction():
                session.rollback()
            with session.begin():
                session.execute(
                    delete(IdempotencyKey)
                    .where(
                        self._row_filter(),
                        IdempotencyKey.status_code == PENDING,
                        IdempotencyKey.created_at == stamp,
                    )
                    .execution_options(synchronize_session=False)
                )
        except SQLAlchemyError as exc:
            log.warning("could not release Idempotency-Key reservation: %s", exc)

    def commit_or_replay(
        self, session: Session, write: Callable[[Session], StoredResponse]
    ) -> StoredResponse:
        """Run ``write`` in a transaction that also stores the key's outcome. Reserves the
        key first if the caller did not (and then releases it if ``write`` fails)."""
        reserved_here = False
        if self.key is not None and self._stamp is None:
            stored = self.reserve(session)
            if stored is not None:
                return stored
            reserved_here = True
        try:
            with session.begin():
                response = write(session)
                if self.key is not None:
                    self._store(session, response)
        except BaseException:
            if reserved_here:
                self.release(session)
            raise
        self._stored = self.key is not None
        return response


def reserves_key(fn: Callable[P, StoredResponse]) -> Callable[P, StoredResponse]:
    """Decorate a write sequence taking keyword arguments ``session`` and ``idem``: the key
    is reserved before it runs (a stored outcome is answered without running it), and
    released if it fails or returns without storing an outcome."""

    @functools.wraps(fn)
    def sequence(*args: P.args, **kwargs: P.kwargs) -> StoredResponse:
        session, idem = kwargs["session"], kwargs["idem"]
        assert isinstance(session, Session)
        assert isinstance(idem, IdempotentRequest)
        stored = idem.reserve(session)
        if stored is not None:
            return stored
        try:
            return fn(*args, **kwargs)
        finally:
            idem.release(session)

    return sequence
