"""Jobs: leased, kept alive, completed and failed by workers over HTTP; read by submitters.

Workers hold no database credentials: everything they need is in the job's payload, and
everything they produce comes back through ``complete`` (a JSON result, plus the new
expert's weights when the job's method produces one: ``registry.protocol.produces_expert``),
fenced by the token their lease gave them and accepted only from the bearer token that
holds the lease; the fencing token is shown to that holder only. A suspended worker token
(registry/services/workers.py) is refused on every route here (403 ``token_suspended``).
Each route parses, authorizes and calls one service function (registry/services/leases.py,
registry/services/completion.py).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from registry.api.deps import RuntimeDep, SessionDep, require_roles
from registry.api.hygiene import check_json_text, reject_json_constant
from registry.api.openapi import problems
from registry.api.uploads import ParsedForm, parse_multipart
from registry.db.models import Job
from registry.errors import BadRequest, Forbidden, PayloadTooLarge, UnsupportedMediaType
from registry.protocol import JOB_KINDS, produces_expert
from registry.protocol.refs import INT64_MAX, INT64_MIN, BigInt
from registry.runtime import Runtime
from registry.services import jobs as svc
from registry.services.completion import complete_job
from registry.services.leases import fail_job, heartbeat_job, lease_job
from registry.services.tokens import Principal
from registry.services.workers import TokenSuspended

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def _active(*roles: str) -> Callable[[Principal], Awaitable[Principal]]:
    """``require_roles``, and the token is not suspended."""

    check = Depends(require_roles(*roles))

    # A default, not an annotation: annotations are strings here and cannot see ``roles``.
    async def dependency(principal: Principal = check) -> Principal:
        if principal.suspended:
            raise TokenSuspended()
        return principal

    return dependency


WorkerPrincipal = Annotated[Principal, Depends(_active("worker", "admin"))]
AnyPrincipal = Annotated[Principal, Depends(_active("contributor", "moderator", "admin", "worker"))]


class LeaseIn(BaseModel):
    worker: str = Field(description="a name for the worker (host, pid): shown as lease_owner")
    kinds: list[str] | None = Field(default=None, description=f"only these kinds: {svc.KINDS}")
    lease_seconds: int | None = Field(
        default=None, description="lease length; default the registry's job_lease_seconds"
    )


class HeartbeatIn(BaseModel):
    fencing_token: BigInt
    progress: dict[str, Any] | None = Field(
        default=None, description='e.g. {"done": 3, "total": 10, "message": "distill"}'
    )


class FailIn(BaseModel):
    fencing_token: BigInt
    error: str = Field(default="", description="what went wrong (kept, truncated to 4000 chars)")
    retryable: bool = Field(default=True, description="false: the job fails for good now")
    release: bool = Field(
        default=False, description="give the job back unfinished (shutdown); not an attempt"
    )


def _is_staff(principal: Principal) -> bool:
    return principal.role in ("moderator", "admin", "worker")


@router.post(
    "/lease",
    summary="Lease the oldest runnable job (workers); 204 when there is none",
    responses={204: {"description": "nothing to do now"}},
)
def lease(
    body: LeaseIn, runtime: RuntimeDep, session: SessionDep, principal: WorkerPrincipal
) -> Response:
    view = lease_job(
        session=session,
        settings=runtime.settings,
        principal=principal,
        worker=body.worker,
        kinds=body.kinds,
        lease_seconds=body.lease_seconds,
    )
    if view is None:
        return Response(status_code=204)
    runtime.metrics.record_job(kind=view["kind"], event="leased")
    return JSONResponse({"job": view})


@router.post(
    "/{job_id}/heartbeat",
    summary="Extend a lease (409 lease_lost if it is gone)",
    responses=problems(
        {
            403: "not_lease_holder, token_suspended",
            404: "job_not_found",
            409: "lease_lost",
            413: "progress_too_large",
        }
    ),
)
def heartbeat(
    job_id: str,
    body: HeartbeatIn,
    runtime: RuntimeDep,
    session: SessionDep,
    principal: WorkerPrincipal,
) -> dict[str, Any]:
    return heartbeat_job(
        session=session,
        settings=runtime.settings,
        principal=principal,
        job_id=job_id,
        fencing_token=body.fencing_token,
        progress=body.progress,
    )


@router.post(
    "/{job_id}/fail",
    summary="Report a failure, or release the job (shutdown)",
    responses=problems(
        {403: "not_lease_holder, token_suspended", 404: "job_not_found", 409: "lease_lost"}
    ),
)
def fail(
    job_id: str,
    body: FailIn,
    runtime: RuntimeDep,
    session: SessionDep,
    principal: WorkerPrincipal,
) -> dict[str, Any]:
    view = fail_job(
        session=session,
        settings=runtime.settings,
        principal=principal,
        job_id=job_id,
        fencing_token=body.fencing_token,
        error=body.error,
        retryable=body.retryable,
        release=body.release,
    )
    event = "released" if body.release else ("retried" if view["status"] == "queued" else "failed")
    runtime.metrics.record_job(
        kind=view["kind"], event=event if view["status"] != "dead" else "dead"
    )
    return view


_EXPERT_KINDS = [kind for kind in JOB_KINDS if produces_expert(kind)]
_RESULT_DOC = (
    "compose.*: {weights (one per expert), base_weight and with_base (ensemble, distill: "
    "the base as one more path; weights + base_weight sum to 1), metrics, details}; "
    "evaluate: {results: {text set: {bits_per_byte, base_bits_per_byte, delta_vs_base, "
    "tokens, bytes}}} (registry.protocol: ComposeResult, EvaluationResult)"
)
_COMPLETE_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["fencing_token", "result"],
                    "properties": {
                        "fencing_token": {"type": "integer"},
                        "result": {"type": "object", "description": _RESULT_DOC},
                    },
                }
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["fencing_token", "result", "weights"],
                    "properties": {
                        "fencing_token": {"type": "string"},
                        "result": {
                            "type": "string",
                            "description": f"a JSON object: {_RESULT_DOC}",
                        },
                        "weights": {
                            "type": "string",
                            "format": "binary",
                            "description": f"the new expert ({', '.join(_EXPERT_KINDS)})",
                        },
                    },
                }
            },
        },
    }
}


def _parse_result(raw: Any, limit: int) -> dict[str, Any]:
    if isinstance(raw, str):
        if len(raw.encode("utf-8")) > limit:
            raise PayloadTooLarge(f"result is limited to {limit} bytes", code="result_too_large")
        try:
            raw = json.loads(raw, parse_constant=reject_json_constant)
        except (ValueError, RecursionError) as exc:
            raise BadRequest("result is not valid JSON", code="invalid_result") from exc
    if not isinstance(raw, dict):
        raise BadRequest("result must be a JSON object", code="invalid_result")
    # A multipart result is not seen by registry/api/hygiene.py: the same string checks.
    check_json_text(raw, "$.result")
    if len(json.dumps(raw)) > limit:
        raise PayloadTooLarge(f"result is limited to {limit} bytes", code="result_too_large")
    return raw


def _token(raw: Any) -> int:
    try:
        if isinstance(raw, bool):
            raise ValueError
        value = int(raw)
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadRequest("fencing_token must be an integer", code="invalid_fencing_token") from exc
    if not INT64_MIN <= value <= INT64_MAX:
        raise BadRequest("fencing_token is out of range", code="invalid_fencing_token")
    return value


async def _read_completion(
    request: Request, runtime: Runtime
) -> tuple[ParsedForm | None, Any, Any]:
    """The completion's form (multipart: with the weights staged), token and result, raw."""
    limit = runtime.settings.max_job_result_bytes
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    form: ParsedForm | None = None
    if content_type == "multipart/form-data":
        form = await parse_multipart(
            request,
            staging=runtime.staging,
            file_limits={"weights": runtime.settings.max_expert_bytes},
            field_names={"fencing_token", "result"},
            field_limit=limit,
            required_files=(),
            required_fields={"fencing_token", "result"},
        )
        raw_token: Any = form.fields["fencing_token"]
        raw_result: Any = form.fields["result"]
    elif content_type == "application/json":
        body = await request.body()
        if len(body) > limit + 1024:
            raise PayloadTooLarge(f"result is limited to {limit} bytes", code="result_too_large")
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise BadRequest("the body is not valid JSON", code="invalid_json") from exc
        if not isinstance(doc, dict):
            raise BadRequest("the body must be a JSON object", code="invalid_json")
        raw_token, raw_result = doc.get("fencing_token"), doc.get("result")
    else:
        raise UnsupportedMediaType(
            "complete takes application/json, or multipart/form-data with a weights file",
            code="unsupported_media_type",
        )
    return form, raw_token, raw_result


@router.post(
    "/{job_id}/complete",
    summary="Complete a leased job with its result (and output weights), fenced",
    openapi_extra=_COMPLETE_DOC,
    responses=problems(
        {
            400: "invalid_fencing_token, invalid_result, invalid_json, unexpected_output",
            403: "not_lease_holder, token_suspended",
            404: "job_not_found",
            409: "lease_lost",
            413: "result_too_large, file_too_large",
            415: "unsupported_media_type (application/json or multipart/form-data)",
            422: "invalid_result, and the validation codes of docs/validation.md for weights",
        }
    ),
)
async def complete(
    job_id: str,
    request: Request,
    runtime: RuntimeDep,
    session: SessionDep,
    principal: WorkerPrincipal,
) -> JSONResponse:
    limit = runtime.settings.max_job_result_bytes
    form, raw_token, raw_result = await _read_completion(request, runtime)
    try:
        token = _token(raw_token)
        result = _parse_result(raw_result, limit)
        weights = form.files.get("weights") if form is not None else None
        view = await run_in_threadpool(
            lambda: complete_job(
                session=session,
                runtime=runtime,
                principal=principal,
                job_id=job_id,
                fencing_token=token,
                result=result,
                weights=weights,
            )
        )
    finally:
        if form is not None:
            form.discard()
    runtime.metrics.record_job(kind=view["kind"], event="succeeded")
    return JSONResponse(view)


@router.get(
    "/{job_id}",
    summary="A job's status, progress and result",
    responses=problems({403: "not_owner, token_suspended", 404: "job_not_found"}),
)
def get_job(job_id: str, session: SessionDep, principal: AnyPrincipal) -> dict[str, Any]:
    with session.begin():
        job = svc.get_job(session=session, job_id=job_id)
        _check_reader(job, principal)
        return svc.job_view(job, viewer_token_id=principal.token_id)


def _check_reader(job: Job, principal: Principal) -> None:
    if job.created_by != principal.name and not _is_staff(principal):
        raise Forbidden(
            "only the job's submitter, moderators, admins and workers read a job",
            code="not_owner",
        )


@router.get("", summary="List jobs, newest first (moderators and admins)")
def list_jobs(
    session: SessionDep,
    principal: Annotated[Principal, Depends(_active("moderator", "admin"))],
    status: str | None = None,
    kind: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> dict[str, Any]:
    with session.begin():
        rows = svc.list_jobs(session=session, status=status, kind=kind, limit=limit)
        return {"items": [svc.job_view(j, viewer_token_id=principal.token_id) for j in rows]}
