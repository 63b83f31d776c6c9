"""Reports of experts: file one (any token), list the queue or one's own, read one (its
reporter, moderators, admins), resolve one (moderators, admins): docs/governance.md,
"Reports"."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from registry.api.common import idempotent_request, json_response
from registry.api.deps import RuntimeDep, SessionDep, require_roles
from registry.api.openapi import problems
from registry.protocol.refs import INT32_MAX, NOT_BLANK
from registry.services import reports as svc
from registry.services.idempotency import StoredResponse
from registry.services.tokens import ROLES, Principal

router = APIRouter(tags=["reports"])

AnyToken = Annotated[Principal, Depends(require_roles(*ROLES))]
Moderator = Annotated[Principal, Depends(require_roles("moderator", "admin"))]
ReportId = Annotated[int, Path(ge=1, le=INT32_MAX)]
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key")]


def _fingerprint(**fields: Any) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class ReportIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(
        min_length=1,
        max_length=svc.MAX_REASON_CHARS,
        description="why; required, not blank",
        json_schema_extra={"pattern": NOT_BLANK},
    )
    evidence: str | None = Field(
        default=None, max_length=svc.MAX_EVIDENCE_CHARS, description="optional supporting text"
    )


class ResolveIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    resolution: Literal["dismiss", "disable"]
    note: str | None = Field(
        default=None, max_length=svc.MAX_REASON_CHARS, description="told to the reporter"
    )


class ReportOut(BaseModel):
    id: int
    expert_id: str
    reporter: str
    reason: str
    evidence: str
    status: str = Field(description="open, dismissed, or disabled")
    resolution: str | None = Field(description="the moderator's note")
    resolved_by: str | None
    resolved_at: str | None
    moderation_action: int | None = Field(description="the disable that resolved it")
    created_at: str


class ReportListOut(BaseModel):
    items: list[ReportOut]


@router.post(
    "/v1/experts/{expert_id}/reports",
    status_code=201,
    summary="Report an expert (any token): a reason, optional evidence text",
    response_model=ReportOut,
    responses=problems(
        {400: "missing_reason, reason_too_long, evidence_too_long", 404: "expert_not_found"}
    ),
)
async def file_report(
    *,
    expert_id: str,
    body: ReportIn,
    request: Request,
    session: SessionDep,
    principal: AnyToken,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """With an Idempotency-Key, a retry answers the first report instead of filing a
    second one."""
    idem = idempotent_request(
        request,
        principal,
        idempotency_key,
        _fingerprint(expert_id=expert_id, reason=body.reason, evidence=body.evidence),
    )

    def write(s: Session) -> StoredResponse:
        report = svc.file_report(
            session=s,
            principal=principal,
            expert_id=expert_id,
            reason=body.reason,
            evidence=body.evidence,
        )
        return StoredResponse(201, svc.report_view(report))

    return json_response(await run_in_threadpool(idem.commit_or_replay, session, write))


@router.get(
    "/v1/reports",
    summary="Moderators: the report queue (default open, oldest first); others: their own",
    response_model=ReportListOut,
    responses=problems({400: "invalid_request (an unknown status)"}),
)
def list_reports(
    session: SessionDep,
    principal: AnyToken,
    status: Literal["open", "dismissed", "disabled"] | None = None,
    limit: Annotated[int, Query(ge=1, le=svc.MAX_PAGE)] = 50,
) -> dict[str, Any]:
    with session.begin():
        rows = svc.list_reports(session=session, principal=principal, status=status, limit=limit)
        return {"items": [svc.report_view(r) for r in rows]}


@router.get(
    "/v1/reports/{report_id}",
    summary="A report and its outcome (its reporter, moderators, admins)",
    response_model=ReportOut,
    responses=problems({403: "not_reporter", 404: "report_not_found"}),
)
def get_report(report_id: ReportId, session: SessionDep, principal: AnyToken) -> dict[str, Any]:
    with session.begin():
        report = svc.get_report(session=session, report_id=report_id)
        svc.check_reader(report, principal)
        return svc.report_view(report)


@router.post(
    "/v1/reports/{report_id}/resolve",
    summary="Resolve a report (moderator/admin): dismiss it, or disable the expert",
    response_model=ReportOut,
    responses=problems(
        {
            400: "invalid_resolution, note_too_long",
            404: "report_not_found",
            409: "report_resolved, status_unchanged (already disabled)",
        }
    ),
)
async def resolve_report(
    *,
    report_id: ReportId,
    body: ResolveIn,
    request: Request,
    runtime: RuntimeDep,
    session: SessionDep,
    principal: Moderator,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """With an Idempotency-Key, a retry answers the first resolution (not 409
    ``report_resolved``)."""
    idem = idempotent_request(
        request,
        principal,
        idempotency_key,
        _fingerprint(report_id=report_id, resolution=body.resolution, note=body.note),
    )

    def write(s: Session) -> StoredResponse:
        report = svc.resolve(
            session=s,
            principal=principal,
            report_id=report_id,
            resolution=body.resolution,
            note=body.note,
        )
        return StoredResponse(200, svc.report_view(report))

    def run() -> StoredResponse:
        response = idem.commit_or_replay(session, write)
        # A disable leaves this replica's search index before the answer.
        runtime.retrieval.sync()
        return response

    return json_response(await run_in_threadpool(run))
