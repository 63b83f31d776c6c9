"""The audit log (moderators and admins): list its entries, and verify its hash chain
(registry/services/audit.py; docs/governance.md, "Audit log")."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from registry.api.deps import SessionDep, require_roles
from registry.api.openapi import problems
from registry.services import audit as svc
from registry.services.tokens import Principal

router = APIRouter(prefix="/v1/audit", tags=["audit"])

Moderator = Annotated[Principal, Depends(require_roles("moderator", "admin"))]


class AuditEntryOut(BaseModel):
    seq: int = Field(description="1, 2, ... in order; a gap is a deleted entry")
    at: str = Field(description="UTC with microseconds, e.g. 2026-12-03T09:30:00.123456Z")
    actor: str = Field(description="who acted: a token's name, or `registry` itself")
    action: str = Field(description="e.g. expert.disable, token.create")
    target: str = Field(description="what it was done to: expert:<id>, token:<id>")
    reason: str
    detail: dict[str, Any]
    prev_hash: str = Field(description="the previous entry's hash (64 zeros before the first)")
    hash: str = Field(description="sha256 of this entry's fields and prev_hash")


class AuditPageOut(BaseModel):
    items: list[AuditEntryOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next (older) page")


class ChainHeadOut(BaseModel):
    seq: int
    hash: str


class ChainBreakOut(BaseModel):
    seq: int = Field(description="the sequence number of the first entry that fails")
    position: int = Field(description="its place among the stored entries, from 1")
    problem: str = Field(
        description="sequence_gap, prev_hash_mismatch, hash_mismatch or unreadable"
    )
    expected: str
    found: str
    detail: str


class AuditVerifyOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    ok: bool
    count: int = Field(description="entries verified, in order, before any break")
    head: ChainHeadOut | None = Field(description="the newest stored entry")
    break_: ChainBreakOut | None = Field(alias="break", description="the first break, if any")


@router.get(
    "",
    summary="List the audit log, newest first (moderators and admins; cursor-paginated)",
    response_model=AuditPageOut,
    responses=problems({400: "invalid_cursor, invalid_time, invalid_time_range"}),
)
def list_audit(
    *,
    session: SessionDep,
    principal: Moderator,
    target: Annotated[str | None, Query(max_length=200, description="e.g. expert:ex_...")] = None,
    actor: Annotated[str | None, Query(max_length=100)] = None,
    action: Annotated[str | None, Query(max_length=40, description="e.g. token.revoke")] = None,
    since: Annotated[dt.datetime | None, Query(description="at or after (with a zone)")] = None,
    until: Annotated[dt.datetime | None, Query(description="before (with a zone)")] = None,
    limit: Annotated[int, Query(ge=1, le=svc.MAX_PAGE)] = svc.DEFAULT_PAGE,
    cursor: str | None = None,
) -> dict[str, Any]:
    with session.begin():
        rows, next_cursor = svc.list_entries(
            session=session,
            target=target,
            actor=actor,
            action=action,
            since=since,
            until=until,
            limit=limit,
            cursor=cursor,
        )
        return {"items": [svc.entry_view(r) for r in rows], "next_cursor": next_cursor}


@router.get(
    "/verify",
    summary="Recompute the audit log's hash chain; report the first break (moderators, admins)",
    response_model=AuditVerifyOut,
)
def verify_audit(session: SessionDep, principal: Moderator) -> dict[str, Any]:
    with session.begin():
        return svc.verify(session=session).to_json()
