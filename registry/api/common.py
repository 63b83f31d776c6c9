"""Helpers shared by the write routes: the stored response as JSON, and the tail every
upload route shares (idempotency binding, the outcome metric, staging cleanup)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from registry.api.uploads import ParsedForm
from registry.errors import AgoraError, BadRequest
from registry.runtime import Runtime
from registry.services.idempotency import IdempotentRequest, StoredResponse
from registry.services.tokens import Principal
from registry.validation.text import text_problem


def idempotent_request(
    request: Request, principal: Principal, key: str | None, fingerprint: str
) -> IdempotentRequest:
    """The POST's Idempotency-Key (400 if malformed), bound to its token and content."""
    return IdempotentRequest(
        principal=principal,
        key=key,
        method=request.method,
        path=request.url.path,
        fingerprint=fingerprint,
        reservation_seconds=request.app.state.runtime.settings.idempotency_reservation_seconds,
    )


def json_response(response: StoredResponse) -> JSONResponse:
    return JSONResponse(response.body, status_code=response.status_code)


def record_outcome(runtime: Runtime, *, kind: str, accepted: bool, size: int) -> None:
    runtime.metrics.record_upload(
        kind=kind, outcome="accepted" if accepted else "rejected", size=size
    )


StoreUpload = Callable[[Runtime, Session, Principal, ParsedForm, IdempotentRequest], StoredResponse]


def check_form_text(form: ParsedForm) -> None:
    """400 ``invalid_characters`` for a form field with a NUL (UTF-8 decoding already
    refused surrogates): the multipart twin of registry/api/hygiene.py's JSON checks."""
    for name in sorted(form.fields):
        problem = text_problem(form.fields[name])
        if problem is not None:
            raise BadRequest(
                f"form field {name!r} {problem}",
                code="invalid_characters",
                errors=[{"path": name, "message": problem}],
            )


async def store_upload(
    *,
    request: Request,
    runtime: Runtime,
    session: Session,
    principal: Principal,
    form: ParsedForm,
    idempotency_key: str | None,
    kind: str,
    store: StoreUpload,
) -> JSONResponse:
    """The tail every upload route shares: bind the Idempotency-Key to the staged content,
    run ``store`` (one service write sequence: validate, commit blobs, commit rows) off
    the event loop, count the outcome, and always discard the staging files, whatever
    happened."""
    size = sum(f.size for f in form.files.values())
    try:
        check_form_text(form)
        idem = idempotent_request(request, principal, idempotency_key, form.fingerprint())
        response = await run_in_threadpool(store, runtime, session, principal, form, idem)
    except AgoraError:
        record_outcome(runtime, kind=kind, accepted=False, size=size)
        raise
    finally:
        form.discard()
    record_outcome(runtime, kind=kind, accepted=True, size=size)
    return json_response(response)
