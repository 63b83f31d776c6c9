"""Helpers shared by the upload routes: idempotent replay and the upload outcome metric."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from registry.api.uploads import ParsedForm
from registry.errors import AgoraError
from registry.runtime import Runtime
from registry.services import idempotency
from registry.services.idempotency import StoredResponse
from registry.services.tokens import Principal

IDEMPOTENCY_HEADER = "Idempotency-Key"


class IdempotentRequest:
    """The Idempotency-Key of one POST, if it carried one, bound to its token and content."""

    def __init__(
        self, *, principal: Principal, key: str | None, method: str, path: str, fingerprint: str
    ) -> None:
        self.principal = principal
        self.key = idempotency.check_key(key) if key is not None else None
        self.method = method
        self.path = path
        self.fingerprint = fingerprint

    def replay(self, session: Session) -> StoredResponse | None:
        if self.key is None:
            return None
        with session.begin():
            return idempotency.lookup(
                session=session,
                token_id=self.principal.token_id,
                key=self.key,
                method=self.method,
                path=self.path,
                fingerprint=self.fingerprint,
            )

    def remember(self, session: Session, response: StoredResponse) -> None:
        """Store the outcome in the caller's (open) transaction, beside the rows it made."""
        if self.key is None:
            return
        idempotency.remember(
            session=session,
            token_id=self.principal.token_id,
            key=self.key,
            method=self.method,
            path=self.path,
            fingerprint=self.fingerprint,
            response=response,
        )

    def commit_or_replay(
        self, session: Session, write: Callable[[Session], StoredResponse]
    ) -> StoredResponse:
        """Run ``write`` in a transaction that also stores the key; if a concurrent request
        with the same key won the race, answer what it stored (or 409 if it differed)."""
        try:
            with session.begin():
                response = write(session)
                self.remember(session, response)
            return response
        except IntegrityError:
            if self.key is None:
                raise
            stored = self.replay(session)
            if stored is None:
                raise
            return stored


def json_response(response: StoredResponse) -> JSONResponse:
    return JSONResponse(response.body, status_code=response.status_code)


def record_outcome(runtime: Runtime, *, kind: str, accepted: bool, size: int) -> None:
    runtime.metrics.record_upload(
        kind=kind, outcome="accepted" if accepted else "rejected", size=size
    )


StoreUpload = Callable[[Runtime, Principal, ParsedForm, "IdempotentRequest"], StoredResponse]


async def store_upload(
    *,
    request: Request,
    runtime: Runtime,
    principal: Principal,
    form: ParsedForm,
    idempotency_key: str | None,
    kind: str,
    store: StoreUpload,
) -> JSONResponse:
    """The tail every upload route shares: bind the Idempotency-Key to the staged content,
    run ``store`` (validate, commit blobs, commit rows) off the event loop, count the
    outcome, and always discard the staging files, whatever happened."""
    size = sum(f.size for f in form.files.values())
    try:
        idem = IdempotentRequest(
            principal=principal,
            key=idempotency_key,
            method="POST",
            path=request.url.path,
            fingerprint=form.fingerprint(),
        )
        response = await run_in_threadpool(store, runtime, principal, form, idem)
    except AgoraError:
        record_outcome(runtime, kind=kind, accepted=False, size=size)
        raise
    finally:
        form.discard()
    record_outcome(runtime, kind=kind, accepted=True, size=size)
    return json_response(response)
