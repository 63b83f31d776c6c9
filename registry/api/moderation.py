"""Moderation routes: disable / re-enable an expert (moderator or admin, reason required),
withdraw / restore one's own expert (its owner or an admin), an expert's lineage, and the
list of actions taken on one expert (docs/governance.md, "States")."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from registry.api.common import idempotent_request, json_response
from registry.api.deps import RuntimeDep, SessionDep, require_roles
from registry.api.openapi import problems
from registry.runtime import Runtime
from registry.services import governance, verification
from registry.services import moderation as svc
from registry.services.experts import get_expert
from registry.services.tokens import Principal

router = APIRouter(prefix="/v1/experts", tags=["moderation"])

Moderator = Annotated[Principal, Depends(require_roles("moderator", "admin"))]


class ReasonIn(BaseModel):
    # Optional here so that a missing reason is the service's `missing_reason`, not a
    # generic validation error.
    reason: str | None = Field(default=None, description="why; required, non-empty")


class ModerationOut(BaseModel):
    id: int
    expert_id: str
    action: str = Field(description="disable or enable")
    status: str = Field(description="the expert's status after the action")
    reason: str
    actor: str
    at: str


class ModerationListOut(BaseModel):
    items: list[ModerationOut]


async def _moderate(
    *,
    request: Request,
    runtime: Runtime,
    session: Session,
    principal: Principal,
    expert_id: str,
    action: str,
    body: ReasonIn | None,
    idempotency_key: str | None,
) -> JSONResponse:
    reason = body.reason if body is not None else None
    svc.check_reason(reason)
    fingerprint = hashlib.sha256(
        json.dumps({"expert_id": expert_id, "reason": reason}, sort_keys=True).encode()
    ).hexdigest()
    idem = idempotent_request(request, principal, idempotency_key, fingerprint)
    response = await run_in_threadpool(
        lambda: svc.moderate(
            session=session,
            retrieval=runtime.retrieval,
            principal=principal,
            expert_id=expert_id,
            action=action,
            reason=reason,
            idem=idem,
        )
    )
    return json_response(response)


@router.post(
    "/{expert_id}/disable",
    summary="Disable an expert (moderator/admin): withdrawn from search and downloads at once",
    response_model=ModerationOut,
    responses=problems({400: "missing_reason", 409: "status_unchanged (already disabled)"}),
)
async def disable_expert(
    *,
    expert_id: str,
    request: Request,
    runtime: RuntimeDep,
    session: SessionDep,
    principal: Moderator,
    body: Annotated[ReasonIn | None, Body()] = None,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONResponse:
    return await _moderate(
        request=request,
        runtime=runtime,
        session=session,
        principal=principal,
        expert_id=expert_id,
        action="disable",
        body=body,
        idempotency_key=idempotency_key,
    )


@router.post(
    "/{expert_id}/enable",
    summary="Re-enable a disabled expert (moderator/admin)",
    response_model=ModerationOut,
    responses=problems({400: "missing_reason", 409: "status_unchanged (already active)"}),
)
async def enable_expert(
    *,
    expert_id: str,
    request: Request,
    runtime: RuntimeDep,
    session: SessionDep,
    principal: Moderator,
    body: Annotated[ReasonIn | None, Body()] = None,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONResponse:
    return await _moderate(
        request=request,
        runtime=runtime,
        session=session,
        principal=principal,
        expert_id=expert_id,
        action="enable",
        body=body,
        idempotency_key=idempotency_key,
    )


Owner = Annotated[Principal, Depends(require_roles("contributor", "admin"))]


class OwnerReasonIn(BaseModel):
    reason: str | None = Field(default=None, description="why (optional)")


@router.post(
    "/{expert_id}/withdraw",
    summary="Withdraw one's own expert (owner/admin), with everything derived from it",
    response_model=ModerationOut,
    responses=problems({403: "not_owner", 409: "status_unchanged (not withdrawable)"}),
)
async def withdraw_expert(
    *,
    expert_id: str,
    request: Request,
    runtime: RuntimeDep,
    session: SessionDep,
    principal: Owner,
    body: Annotated[OwnerReasonIn | None, Body()] = None,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONResponse:
    return await _owner_action(
        request, runtime, session, principal, expert_id, "withdraw", body, idempotency_key
    )


@router.post(
    "/{expert_id}/restore",
    summary="Restore one's own withdrawn expert (owner/admin)",
    response_model=ModerationOut,
    responses=problems({403: "not_owner", 409: "status_unchanged (not withdrawn)"}),
)
async def restore_expert(
    *,
    expert_id: str,
    request: Request,
    runtime: RuntimeDep,
    session: SessionDep,
    principal: Owner,
    body: Annotated[OwnerReasonIn | None, Body()] = None,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONResponse:
    return await _owner_action(
        request, runtime, session, principal, expert_id, "restore", body, idempotency_key
    )


async def _owner_action(  # noqa: PLR0917 (the route's parameters, passed on)
    request: Request,
    runtime: Runtime,
    session: Session,
    principal: Principal,
    expert_id: str,
    action: str,
    body: OwnerReasonIn | None,
    idempotency_key: str | None,
) -> JSONResponse:
    reason = body.reason if body is not None else None
    fingerprint = hashlib.sha256(
        json.dumps({"expert_id": expert_id, "reason": reason}, sort_keys=True).encode()
    ).hexdigest()
    idem = idempotent_request(request, principal, idempotency_key, fingerprint)
    response = await run_in_threadpool(
        lambda: svc.moderate(
            session=session,
            retrieval=runtime.retrieval,
            principal=principal,
            expert_id=expert_id,
            action=action,
            reason=reason,
            idem=idem,
        )
    )
    return json_response(response)


class LineageNodeOut(BaseModel):
    id: str
    name: str
    status: str
    withdrawn_cause: str | None = Field(
        description="withdrawn_by_lineage: the disabled or withdrawn ancestor"
    )


class LineageOut(LineageNodeOut):
    parents: list[LineageNodeOut]
    children: list[LineageNodeOut]


@router.get(
    "/{expert_id}/lineage",
    summary="An expert's parents and children (average, distill), with their states",
    response_model=LineageOut,
    responses=problems({404: "expert_not_found"}),
)
def get_lineage(expert_id: str, session: SessionDep) -> dict[str, Any]:
    with session.begin():
        expert = get_expert(session=session, expert_id=expert_id)
        return governance.lineage_view(session, expert)


# The status each recorded action left the expert in: a moderator's, an owner's, or a
# check's (registry/services/verification.py).
_STATUS_AFTER = {**svc.ACTIONS, **svc.OWNER_ACTIONS, **verification.ACTIONS}


@router.get(
    "/{expert_id}/moderation",
    summary="The moderation actions taken on an expert (moderator/admin)",
    response_model=ModerationListOut,
)
def list_actions(expert_id: str, session: SessionDep, principal: Moderator) -> dict[str, Any]:
    with session.begin():
        expert = get_expert(session=session, expert_id=expert_id)
        rows = svc.list_actions(session=session, expert_id=expert.id)
        return {
            "items": [
                {**svc.action_view(r), "status": _STATUS_AFTER.get(r.action, "active")}
                for r in rows
            ]
        }
