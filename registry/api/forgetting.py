"""An expert's forgetting reports: what a disable's evaluation jobs measured
(docs/governance.md, "Proof of forgetting"). Anyone reads them: numbers only, no weights,
no sample text."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from registry.api.deps import SessionDep
from registry.api.openapi import problems
from registry.services import forgetting as svc
from registry.services.experts import get_expert

router = APIRouter(prefix="/v1/experts", tags=["moderation"])


class DomainOut(BaseModel):
    with_: float = Field(alias="with", description="bits per byte with the expert")
    without: float = Field(description="bits per byte without it")
    base: float | None = Field(description="bits per byte of the base alone")
    without_vs_base: float | None = Field(description="(without - base) / base")
    with_vs_base: float | None = Field(description="(with - base) / base")


class OtherOut(BaseModel):
    with_: float = Field(alias="with")
    without: float
    change: float | None = Field(description="(without - with) / with")


class ForgettingReportOut(BaseModel):
    id: int
    expert_id: str
    version: int
    composition_id: str | None = Field(description="null: the expert alone, against the base")
    method: str = Field(description="the composition's method, or 'expert'")
    without_method: str = Field(
        description="base, mixture, ensemble, average (re-merged), or teacher_ensemble "
        "(a distillation's teacher without the expert)"
    )
    removed: list[str] = Field(
        description="the experts the model without leaves out: the disabled one, and any "
        "expert withdrawn by lineage because of it that the composition used"
    )
    status: str = Field(description="pending, ready or failed")
    error: str | None
    job_id: str
    moderation_action: int | None
    domain: DomainOut | None = Field(description="on the disabled expert's own samples")
    others: dict[str, OtherOut] = Field(description="on each other expert's samples, by id")
    created_at: str
    updated_at: str


class ForgettingListOut(BaseModel):
    expert_id: str
    items: list[ForgettingReportOut]


@router.get(
    "/{expert_id}/forgetting",
    summary="An expert's forgetting reports, newest first (anyone)",
    response_model=ForgettingListOut,
    response_model_by_alias=True,
    responses=problems({404: "expert_not_found"}),
)
def list_forgetting(expert_id: str, session: SessionDep) -> dict[str, Any]:
    with session.begin():
        expert = get_expert(session=session, expert_id=expert_id)
        rows = svc.list_reports(session=session, expert_id=expert.id)
        return {"expert_id": expert.id, "items": [svc.report_view(r, j) for r, j in rows]}
