"""Jobs: leased, kept alive, completed and failed by workers over HTTP; read by submitters.

Workers hold no database credentials: everything they need is in the job's payload, and
everything they produce comes back through ``complete`` (a JSON result, plus the new
expert's weights for ``compose.average`` / ``compose.distill``), fenced by the token
their lease gave them.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from registry.api.deps import RuntimeDep, SessionDep, require_roles
from registry.api.uploads import ParsedForm, parse_multipart
from registry.contracts import ComposeResult, TextSetScore
from registry.db.models import Job
from registry.errors import (
    BadRequest,
    Forbidden,
    PayloadTooLarge,
    UnsupportedMediaType,
    ValidationFailed,
)
from registry.runtime import Runtime
from registry.services import compositions as comp
from registry.services import experts as expert_svc
from registry.services import jobs as svc
from registry.services.tokens import Principal

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

WorkerPrincipal = Annotated[Principal, Depends(require_roles("worker", "admin"))]
AnyPrincipal = Annotated[
    Principal, Depends(require_roles("contributor", "moderator", "admin", "worker"))
]


def policy(runtime: Runtime) -> svc.JobPolicy:
    s = runtime.settings
    return svc.JobPolicy(
        lease_seconds=s.job_lease_seconds,
        max_attempts=s.job_max_attempts,
        backoff_base_seconds=s.job_backoff_base_seconds,
        backoff_max_seconds=s.job_backoff_max_seconds,
    )


class LeaseIn(BaseModel):
    worker: str = Field(description="a name for the worker (host, pid): shown as lease_owner")
    kinds: list[str] | None = Field(default=None, description=f"only these kinds: {svc.KINDS}")
    lease_seconds: int | None = Field(
        default=None, description="lease length; default the registry's job_lease_seconds"
    )


class HeartbeatIn(BaseModel):
    fencing_token: int
    progress: dict[str, Any] | None = Field(
        default=None, description='e.g. {"done": 3, "total": 10, "message": "distill"}'
    )


class FailIn(BaseModel):
    fencing_token: int
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
def lease(body: LeaseIn, runtime: RuntimeDep, principal: WorkerPrincipal) -> Response:
    worker = svc.check_worker_name(body.worker)
    kinds = svc.check_kinds(body.kinds)
    seconds = svc.check_lease_seconds(body.lease_seconds, runtime.settings.job_lease_seconds)
    with runtime.sessions() as session, session.begin():
        job = svc.lease(session=session, worker=worker, kinds=kinds, lease_seconds=seconds)
        if job is None:
            return Response(status_code=204)
        view = svc.job_view(job, with_token=True)
    runtime.metrics.record_job(kind=view["kind"], event="leased")
    return JSONResponse({"job": view})


@router.post("/{job_id}/heartbeat", summary="Extend a lease (409 lease_lost if it is gone)")
def heartbeat(
    job_id: str, body: HeartbeatIn, runtime: RuntimeDep, principal: WorkerPrincipal
) -> dict[str, Any]:
    progress = body.progress
    if progress is not None and len(json.dumps(progress)) > 4096:
        raise PayloadTooLarge("progress is limited to 4 KiB of JSON", code="progress_too_large")
    with runtime.sessions() as session, session.begin():
        job = svc.heartbeat(
            session=session, job_id=job_id, fencing_token=body.fencing_token, progress=progress
        )
        return {
            "status": job.status,
            "lease_expires_at": job.lease_expires_at.isoformat() if job.lease_expires_at else None,
        }


@router.post("/{job_id}/fail", summary="Report a failure, or release the job (shutdown)")
def fail(
    job_id: str, body: FailIn, runtime: RuntimeDep, principal: WorkerPrincipal
) -> dict[str, Any]:
    with runtime.sessions() as session, session.begin():
        job = svc.fail(
            session=session,
            job_id=job_id,
            fencing_token=body.fencing_token,
            error=body.error,
            retryable=body.retryable,
            release=body.release,
            policy=policy(runtime),
        )
        view = svc.job_view(job, with_token=True)
    event = "released" if body.release else ("retried" if view["status"] == "queued" else "failed")
    runtime.metrics.record_job(
        kind=view["kind"], event=event if view["status"] != "dead" else "dead"
    )
    return view


_RESULT_DOC = (
    "compose.*: {weights (one per expert), base_weight and with_base (ensemble, distill: "
    "the base as one more path; weights + base_weight sum to 1), metrics, details}; "
    "evaluate: {results: {text set: {bits_per_byte, base_bits_per_byte, delta_vs_base, "
    "tokens, bytes}}} (registry/contracts.py: ComposeResult, EvaluationResult)"
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
                            "description": "the new expert (compose.average, compose.distill)",
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
            raw = json.loads(raw)
        except ValueError as exc:
            raise BadRequest("result is not valid JSON", code="invalid_result") from exc
    if not isinstance(raw, dict):
        raise BadRequest("result must be a JSON object", code="invalid_result")
    if len(json.dumps(raw)) > limit:
        raise PayloadTooLarge(f"result is limited to {limit} bytes", code="result_too_large")
    return raw


def _token(raw: Any) -> int:
    try:
        if isinstance(raw, bool):
            raise ValueError
        return int(raw)
    except (TypeError, ValueError) as exc:
        raise BadRequest("fencing_token must be an integer", code="invalid_fencing_token") from exc


def _complete(
    runtime: Runtime,
    job_id: str,
    token: int,
    result: dict[str, Any],
    form: ParsedForm | None,
) -> dict[str, Any]:
    weights = form.files.get("weights") if form is not None else None
    with runtime.sessions() as session:
        with session.begin():
            job = svc.completion_target(session=session, job_id=job_id, fencing_token=token)
            if job is None:  # this completion already happened: replay it
                return svc.job_view(svc.get_job(session=session, job_id=job_id), with_token=True)
            kind = job.kind
            produces_expert = kind in ("compose.average", "compose.distill")
            if produces_expert and weights is None:
                raise ValidationFailed(
                    f"{kind} completes with the new expert's weights (multipart file 'weights')",
                    code="missing_output",
                )
            if not produces_expert and weights is not None:
                raise BadRequest(f"{kind} produces no weights", code="unexpected_output")
            checked_eval: dict[str, TextSetScore] = {}
            checked = ComposeResult()
            if kind == "evaluate":
                checked_eval = comp.check_evaluation_result(job, result)
            else:
                checked = comp.check_compose_result(job, result)
            staged = None
            if produces_expert:
                assert weights is not None
                parents = comp.parents_of(session=session, job=job)
                base = expert_svc.find_stored_base(
                    session=session, revision=job.payload["base_revision"]
                )
                sheet = comp.derived_datasheet(
                    job=job,
                    parents=parents,
                    weights=checked.weights or job.payload.get("weights"),
                    created_by=job.created_by,
                )
                staged = (parents, base, sheet)
        output: dict[str, Any] | None = None
        vectors = None
        validated = None
        key = ""
        if staged is not None:
            assert weights is not None
            parents, base, sheet = staged
            validated = expert_svc.validate_submission(
                base=base,
                base_revision=base.revision,
                weights_path=weights.path,
                datasheet=sheet,
                max_expert_bytes=runtime.settings.max_expert_bytes,
                max_datasheet_bytes=runtime.settings.max_datasheet_bytes,
            )
            vectors = runtime.retrieval.vectors_for_samples(validated.samples)
            # Blob before rows: a failure in between leaves an orphan for the collector.
            key = runtime.store.commit(weights.path, weights.sha256)
        with session.begin():
            job = svc.completion_target(session=session, job_id=job_id, fencing_token=token)
            if job is None:
                return svc.job_view(svc.get_job(session=session, job_id=job_id), with_token=True)
            expert_id = None
            if kind == "evaluate":
                comp.record_evaluations(session=session, job=job, checked=checked_eval)
            else:
                if validated is not None and weights is not None and vectors is not None:
                    parents = comp.parents_of(session=session, job=job)
                    owner = Principal(token_id=0, name=job.created_by, role="contributor")
                    expert, version = expert_svc.record_version(
                        session=session,
                        principal=owner,
                        expert_id=None,
                        validated=validated,
                        digest=weights.sha256,
                        size=weights.size,
                        storage_key=key,
                    )
                    comp.record_lineage(
                        session=session,
                        expert_id=expert.id,
                        version=version.version,
                        parents=parents,
                        weights=checked.weights or job.payload.get("weights"),
                    )
                    runtime.retrieval.record_vectors(
                        session=session,
                        expert_id=expert.id,
                        version=version.version,
                        vectors=vectors,
                    )
                    expert_id = expert.id
                    output = {
                        "id": expert.id,
                        "version": version.version,
                        "digest": f"sha256:{version.digest}",
                        "size": version.size,
                    }
                composition = comp.finish_composition(
                    session=session, job=job, checked=checked, output=output, expert_id=expert_id
                )
                result = {**result, "composition_id": composition.id}
                if expert_id is not None:
                    result["expert_id"] = expert_id
            svc.succeed(
                session=session,
                job=job,
                result=result,
                output_digest=weights.sha256 if weights is not None and staged else None,
            )
            view = svc.job_view(job, with_token=True)
    if output is not None:
        runtime.retrieval.sync()
    return view


@router.post(
    "/{job_id}/complete",
    summary="Complete a leased job with its result (and output weights), fenced",
    openapi_extra=_COMPLETE_DOC,
)
async def complete(
    job_id: str, request: Request, runtime: RuntimeDep, principal: WorkerPrincipal
) -> JSONResponse:
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
    try:
        token = _token(raw_token)
        result = _parse_result(raw_result, limit)
        view = await run_in_threadpool(_complete, runtime, job_id, token, result, form)
    finally:
        if form is not None:
            form.discard()
    runtime.metrics.record_job(kind=view["kind"], event="succeeded")
    return JSONResponse(view)


@router.get("/{job_id}", summary="A job's status, progress and result")
def get_job(job_id: str, session: SessionDep, principal: AnyPrincipal) -> dict[str, Any]:
    with session.begin():
        job = svc.get_job(session=session, job_id=job_id)
        _check_reader(job, principal)
        return svc.job_view(job, with_token=principal.role in ("worker", "admin"))


def _check_reader(job: Job, principal: Principal) -> None:
    if job.created_by != principal.name and not _is_staff(principal):
        raise Forbidden(
            "only the job's submitter, moderators, admins and workers read a job",
            code="not_owner",
        )


@router.get("", summary="List jobs, newest first (moderators and admins)")
def list_jobs(
    session: SessionDep,
    principal: Annotated[Principal, Depends(require_roles("moderator", "admin"))],
    status: str | None = None,
    kind: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> dict[str, Any]:
    with session.begin():
        rows = svc.list_jobs(session=session, status=status, kind=kind, limit=limit)
        return {"items": [svc.job_view(j, with_token=principal.is_admin) for j in rows]}
