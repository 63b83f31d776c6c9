"""Monitoring: text sets (moderators and admins upload and delete them; any token lists
them; moderators and admins read their texts), schedules (moderators and admins) and the
runs' numbers (moderators and admins): docs/governance.md, "Monitoring"."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from registry.api.deps import RuntimeDep, SessionDep, require_roles
from registry.api.openapi import problems
from registry.protocol.refs import INT32_MAX
from registry.services import monitoring as svc
from registry.services.tokens import ROLES, Principal

router = APIRouter(tags=["monitoring"])

AnyToken = Annotated[Principal, Depends(require_roles(*ROLES))]
Moderator = Annotated[Principal, Depends(require_roles("moderator", "admin"))]
RowId = Annotated[int, Path(ge=1, le=INT32_MAX)]


class TextSetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=100, description="letters, digits, '.', '_', '-'")
    date: str = Field(max_length=10, description="the set's own date, YYYY-MM-DD")
    texts: list[StrictStr] = Field(min_length=1, description="the texts; blank ones dropped")


class TextSetOut(BaseModel):
    id: int
    name: str
    date: str
    key: str = Field(description="its text set name in evaluations: name@date")
    n_texts: int
    bytes: int
    uploader: str
    created_at: str
    texts: list[str] | None = None


class TextSetListOut(BaseModel):
    items: list[TextSetOut]


class ScheduleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    not_before: dt.datetime | None = Field(
        default=None, description="no run before this time (ISO 8601 with a zone); default now"
    )
    text_sets: list[str] | None = Field(
        default=None,
        max_length=svc.MAX_SETS,
        description="names: the newest set of each; default every name",
    )
    limit: int | None = Field(
        default=None, ge=1, le=svc.MAX_SETS, description="at most this many sets, newest first"
    )
    every_hours: float | None = Field(
        default=None, description="repeat: each expert's next run this long after the last"
    )


class ScheduleOut(BaseModel):
    id: int
    not_before: str
    every_hours: float | None
    text_sets: dict[str, Any]
    created_by: str
    created_at: str
    cancelled_at: str | None
    cancelled_by: str | None
    runs: int
    completed: int
    flagged: int


class ScheduleCreatedOut(ScheduleOut):
    jobs: list[str]


class ScheduleListOut(BaseModel):
    items: list[ScheduleOut]


class CancelledOut(ScheduleOut):
    cancelled_jobs: list[str]


class RunOut(BaseModel):
    job_id: str
    schedule_id: int
    expert_id: str
    version: int
    run_at: str
    completed_at: str | None
    own_bits_per_byte: float | None
    reference_evaluation: int | None
    reference_bits_per_byte: float | None
    worsening: float | None = Field(description="(own - reference) / reference")
    repetition: float | None
    base_repetition: float | None
    report_id: int | None = Field(description="the flag it raised, if any")


class RunListOut(BaseModel):
    items: list[RunOut]


@router.post(
    "/v1/text-sets",
    status_code=201,
    summary="Upload a named, dated text set (moderator/admin)",
    response_model=TextSetOut,
    responses=problems(
        {
            400: "invalid_name, invalid_date, invalid_texts",
            409: "text_set_exists",
            413: "text_set_too_large, too_many_texts",
        }
    ),
)
def upload_text_set(
    body: TextSetIn, runtime: RuntimeDep, session: SessionDep, principal: Moderator
) -> dict[str, Any]:
    with session.begin():
        row = svc.upload_text_set(
            session=session,
            principal=principal,
            settings=runtime.settings,
            name=body.name,
            date=body.date,
            texts=body.texts,
        )
        return svc.text_set_view(row)


@router.get(
    "/v1/text-sets",
    summary="Text sets, newest first (any token; without their texts)",
    response_model=TextSetListOut,
)
def list_text_sets(
    session: SessionDep,
    principal: AnyToken,
    name: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=svc.MAX_PAGE)] = 50,
) -> dict[str, Any]:
    with session.begin():
        rows = svc.list_text_sets(session=session, name=name, limit=limit)
        return {"items": [svc.text_set_view(r) for r in rows]}


@router.get(
    "/v1/text-sets/{text_set_id}",
    summary="A text set with its texts (moderator/admin)",
    response_model=TextSetOut,
    responses=problems({404: "text_set_not_found"}),
)
def get_text_set(text_set_id: RowId, session: SessionDep, principal: Moderator) -> dict[str, Any]:
    with session.begin():
        row = svc.get_text_set(session=session, text_set_id=text_set_id)
        return svc.text_set_view(row, with_texts=True)


@router.delete(
    "/v1/text-sets/{text_set_id}",
    summary="Delete a text set from future runs (moderator/admin)",
    response_model=TextSetOut,
    responses=problems({404: "text_set_not_found"}),
)
def delete_text_set(
    text_set_id: RowId, session: SessionDep, principal: Moderator
) -> dict[str, Any]:
    with session.begin():
        row = svc.delete_text_set(session=session, principal=principal, text_set_id=text_set_id)
        return svc.text_set_view(row)


@router.post(
    "/v1/monitoring/schedules",
    status_code=201,
    summary="Schedule monitoring of every active expert (moderator/admin)",
    response_model=ScheduleCreatedOut,
    responses=problems(
        {
            400: "invalid_time, invalid_interval, invalid_name",
            404: "text_set_not_found",
            413: "texts_too_large",
        }
    ),
)
def create_schedule(
    body: ScheduleIn, runtime: RuntimeDep, session: SessionDep, principal: Moderator
) -> dict[str, Any]:
    with session.begin():
        schedule, runs = svc.create_schedule(
            session=session,
            principal=principal,
            settings=runtime.settings,
            not_before=body.not_before,
            names=body.text_sets,
            limit=body.limit,
            every_hours=body.every_hours,
        )
        return {**svc.schedule_view(session, schedule), "jobs": [r.job_id for r in runs]}


@router.get(
    "/v1/monitoring/schedules",
    summary="Monitoring schedules, newest first (moderator/admin)",
    response_model=ScheduleListOut,
)
def list_schedules(
    session: SessionDep,
    principal: Moderator,
    limit: Annotated[int, Query(ge=1, le=svc.MAX_PAGE)] = 50,
) -> dict[str, Any]:
    with session.begin():
        rows = svc.list_schedules(session=session, limit=limit)
        return {"items": [svc.schedule_view(session, r) for r in rows]}


@router.delete(
    "/v1/monitoring/schedules/{schedule_id}",
    summary="Cancel a schedule and its queued jobs (moderator/admin)",
    response_model=CancelledOut,
    responses=problems({404: "schedule_not_found", 409: "schedule_cancelled"}),
)
def cancel_schedule(
    schedule_id: RowId, session: SessionDep, principal: Moderator
) -> dict[str, Any]:
    with session.begin():
        schedule, cancelled = svc.cancel_schedule(
            session=session, principal=principal, schedule_id=schedule_id
        )
        return {**svc.schedule_view(session, schedule), "cancelled_jobs": cancelled}


@router.get(
    "/v1/monitoring/runs",
    summary="Monitoring runs and their numbers, newest first (moderator/admin)",
    response_model=RunListOut,
)
def list_runs(
    session: SessionDep,
    principal: Moderator,
    expert_id: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=svc.MAX_PAGE)] = 50,
) -> dict[str, Any]:
    with session.begin():
        rows = svc.list_runs(session=session, expert_id=expert_id, limit=limit)
        return {"items": [svc.run_view(r) for r in rows]}
