"""Tokens (admins): create one (its secret is answered once), list them (never a secret),
revoke one. Each creation and revocation is an audit log entry (docs/governance.md)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from registry.api.deps import SessionDep, require_roles
from registry.api.openapi import problems
from registry.protocol.refs import INT32_MAX, NOT_BLANK
from registry.services import tokens as svc
from registry.services.tokens import Principal

router = APIRouter(prefix="/v1/tokens", tags=["tokens"])

Admin = Annotated[Principal, Depends(require_roles("admin"))]


class TokenIn(BaseModel):
    """What an admin chooses; everything else (id, secret, prefix, times, suspension) is
    the server's: a body that names another field is a 400."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(
        min_length=1,
        max_length=100,
        description="who the token is for; the identity that owns what it submits",
        # Not blank: the service's 400 invalid_name, said in the schema too.
        json_schema_extra={"pattern": NOT_BLANK},
    )
    role: str = Field(json_schema_extra={"enum": list(svc.ROLES)})
    trusted: bool = Field(
        default=False, description="a worker token whose outputs you vouch for (docs/jobs.md)"
    )
    reason: str | None = Field(
        default=None, max_length=svc.MAX_REASON_CHARS, description="kept in the audit log"
    )


class TokenOut(BaseModel):
    id: int
    name: str
    role: str
    trusted: bool
    prefix: str = Field(description="the secret's first characters, to tell tokens apart")
    created_at: str
    revoked_at: str | None
    suspended_at: str | None


class TokenCreatedOut(TokenOut):
    secret: str = Field(description="agora_...: shown this once; only its hash is kept")


class TokenListOut(BaseModel):
    items: list[TokenOut]


@router.post(
    "",
    status_code=201,
    summary="Create a token (admin); its secret is in this answer only",
    response_model=TokenCreatedOut,
    responses=problems({400: "unknown_role, invalid_name"}),
)
def create_token(body: TokenIn, session: SessionDep, principal: Admin) -> dict[str, Any]:
    # No Idempotency-Key: a replay would have to store the secret to answer it again.
    view, secret = svc.issue(
        session=session,
        principal=principal,
        name=body.name,
        role=body.role,
        trusted=body.trusted,
        reason=body.reason,
    )
    return {**view, "secret": secret}


@router.get("", summary="List tokens, without their secrets (admin)", response_model=TokenListOut)
def list_tokens(session: SessionDep, principal: Admin) -> dict[str, Any]:
    with session.begin():
        return {"items": [svc.token_view(t) for t in svc.list_tokens(session=session)]}


@router.delete(
    "/{token_id}",
    summary="Revoke a token (admin): refused from its next request on",
    response_model=TokenOut,
    responses=problems({404: "token_not_found"}),
)
def revoke_token(
    token_id: Annotated[int, Path(ge=1, le=INT32_MAX)],
    session: SessionDep,
    principal: Admin,
    reason: Annotated[
        str | None, Query(max_length=svc.MAX_REASON_CHARS, description="kept in the audit log")
    ] = None,
) -> dict[str, Any]:
    return svc.revoke(session=session, principal=principal, token_id=token_id, reason=reason)
