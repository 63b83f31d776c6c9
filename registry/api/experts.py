"""Experts: submit (strictly validated), list, get, versions, datasheet, weights."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from sqlalchemy.orm import Session

from registry.api.common import store_upload
from registry.api.deps import OptionalPrincipal, RuntimeDep, SessionDep, require_roles
from registry.api.downloads import blob_response
from registry.api.openapi import BINARY, download_responses, problems
from registry.api.schemas import ExpertDetailOut, ExpertPageOut, SubmittedOut, VersionListOut
from registry.api.uploads import ParsedForm, parse_multipart
from registry.db.models import Expert
from registry.errors import Forbidden, Unauthenticated
from registry.protocol.refs import INT32_MAX, VersionNumber
from registry.runtime import Runtime
from registry.services import arrival, forgetting
from registry.services import experts as svc
from registry.services.blobs import get_blob
from registry.services.idempotency import IdempotentRequest, StoredResponse
from registry.services.tokens import Principal

router = APIRouter(prefix="/v1/experts", tags=["experts"])

_SUBMIT_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["weights", "datasheet", "base_revision"],
                    "properties": {
                        "weights": {
                            "type": "string",
                            "format": "binary",
                            "description": "safetensors expert (agora.expert/1)",
                        },
                        "datasheet": {
                            "type": "string",
                            "format": "binary",
                            "description": "markdown with YAML front matter",
                        },
                        "base_revision": {"type": "string"},
                        "expert_id": {
                            "type": "string",
                            "description": "add a new version to this expert (its owner only)",
                        },
                        "version": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": INT32_MAX,
                            "description": "the number the new version must get: 409 "
                            "version_conflict if a concurrent upload took it (optional; "
                            "1 for a new expert, else 400 invalid_version)",
                        },
                    },
                }
            }
        },
    }
}


def _submit(
    runtime: Runtime,
    session: Session,
    principal: Principal,
    form: ParsedForm,
    idem: IdempotentRequest,
) -> StoredResponse:
    expert_id = form.fields.get("expert_id", "").strip() or None
    return svc.submit_expert(
        session=session,
        runtime=runtime,
        principal=principal,
        weights=form.files["weights"],
        datasheet=form.files["datasheet"],
        base_revision=form.fields.get("base_revision", "").strip(),
        expert_id=expert_id,
        idem=idem,
        version=svc.parse_version_field(form.fields.get("version"), expert_id=expert_id),
    )


@router.post(
    "",
    status_code=201,
    summary="Submit an expert, or a new version of one's own expert",
    openapi_extra=_SUBMIT_DOC,
    response_model=SubmittedOut,
    responses={
        200: {
            "description": "the caller already stored these weights with this datasheet "
            "(no expert_id): the stored version, nothing new is created",
            "model": SubmittedOut,
        },
        **problems(
            {
                403: "not_owner (a new version of someone else's expert)",
                404: "base_model_not_found, expert_not_found",
                413: "file_too_large, field_too_large, request_too_large",
                415: "expected_multipart",
                422: "the validation codes of docs/validation.md",
            }
        ),
    },
)
async def submit_expert(
    request: Request,
    runtime: RuntimeDep,
    session: SessionDep,
    principal: Annotated[Principal, Depends(require_roles("contributor", "admin"))],
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONResponse:
    """201 with the new expert (or version); 200 with the stored version when the caller
    submits, as a new expert, weights and a datasheet it already stored. Refusals:
    ``base_model_not_found`` / ``expert_not_found`` (404), ``not_owner`` (403), and the
    validation codes of docs/registry.md (422, 413)."""
    s = runtime.settings
    form = await parse_multipart(
        request,
        staging=runtime.staging,
        file_limits={"weights": s.max_expert_bytes, "datasheet": s.max_datasheet_bytes},
        field_names={"base_revision", "expert_id", "version"},
        field_limit=s.max_form_field_bytes,
        required_files={"weights", "datasheet"},
        required_fields={"base_revision"},
    )
    return await store_upload(
        request=request,
        runtime=runtime,
        session=session,
        principal=principal,
        form=form,
        idempotency_key=idempotency_key,
        kind="expert",
        store=_submit,
    )


@router.get(
    "",
    summary="List experts (newest first, cursor-paginated)",
    response_model=ExpertPageOut,
    responses=problems(
        {
            400: "invalid_cursor, invalid_status, invalid_limit",
            401: "missing_token (status other than active)",
            403: "insufficient_role (status other than active: moderators and admins)",
        }
    ),
)
def list_experts(
    *,
    session: SessionDep,
    principal: OptionalPrincipal,
    base_revision: str | None = None,
    status: str = "active",
    q: Annotated[str | None, Query(description="text to find in the domain or name")] = None,
    limit: Annotated[int, Query(ge=1, le=svc.MAX_PAGE)] = svc.DEFAULT_PAGE,
    cursor: str | None = None,
) -> dict[str, Any]:
    if status != "active":
        # Disabled experts are moderation business, not public listings.
        if principal is None:
            raise Unauthenticated("listing non-active experts needs a token", code="missing_token")
        if principal.role not in ("moderator", "admin"):
            raise Forbidden(
                "only moderators and admins list non-active experts", code="insufficient_role"
            )
    with session.begin():
        items, next_cursor = svc.list_experts(
            session=session,
            base_revision=base_revision,
            status=status,
            q=q,
            limit=limit,
            cursor=cursor,
        )
        return {"items": [svc.expert_view(e) for e in items], "next_cursor": next_cursor}


@router.get(
    "/{expert_id}", summary="Get an expert with its versions", response_model=ExpertDetailOut
)
def get_expert(expert_id: str, session: SessionDep) -> dict[str, Any]:
    with session.begin():
        expert = svc.get_expert(session=session, expert_id=expert_id)
        view = svc.expert_view(expert)
        view["versions"] = [
            svc.version_view(v) for v in svc.list_versions(session=session, expert_id=expert.id)
        ]
        view["arrival"] = arrival.arrival_view(session=session, expert_id=expert.id)
        return view


@router.get(
    "/{expert_id}/versions",
    summary="List an expert's immutable versions",
    response_model=VersionListOut,
)
def list_versions(expert_id: str, session: SessionDep) -> dict[str, Any]:
    with session.begin():
        expert = svc.get_expert(session=session, expert_id=expert_id)
        return {
            "items": [
                svc.version_view(v) for v in svc.list_versions(session=session, expert_id=expert.id)
            ]
        }


class MarkdownResponse(PlainTextResponse):
    media_type = "text/markdown"


_ARTIFACT_PROBLEMS = {
    404: "expert_not_found, version_not_found",
    409: "expert_quarantined (awaiting its checks; readable by its owner and staff)",
    451: "expert_disabled (the problem's cause names the expert), digest_disabled",
}
_VERSION_HEADER = {
    "description": "the version served (the latest unless ?version=)",
    "required": True,
    "schema": {"type": "integer"},
}
_WEIGHTS_MEDIA = {"application/octet-stream": BINARY}
_WEIGHTS_HEADERS = {
    "X-Agora-Version": "the version served (the latest unless ?version=)",
    "Content-Disposition": 'attachment; filename="<expert id>-v<version>.safetensors"',
}


def _servable(
    session: Session, expert: Expert, principal: Principal | None, digest: str | None = None
) -> None:
    """451 for a withdrawn expert (naming the cause), or weights a disabled expert carries
    (``digest_disabled``); 409 ``expert_quarantined`` for a quarantined one, but to its
    owner, moderators, admins and workers (docs/architecture.md, "Workers that lie").
    Moderators and admins read withdrawn experts for review: call ``experts.audit_review``.
    So does the worker holding a forgetting job that names it (docs/governance.md, "Proof
    of forgetting")."""
    if expert.status != svc.ACTIVE and forgetting.leased_reader(
        session=session, principal=principal, expert_id=expert.id, digest=digest
    ):
        return
    svc.check_artifacts_readable(expert=expert, principal=principal)
    if digest is not None and not svc.is_reviewer(principal):
        svc.check_digest_not_disabled(session=session, digest=digest, expert_id=expert.id)


@router.get(
    "/{expert_id}/datasheet",
    summary="The datasheet (markdown) of a version, default the latest",
    response_class=MarkdownResponse,
    responses={
        200: {"headers": {"X-Agora-Version": _VERSION_HEADER}},
        **problems(_ARTIFACT_PROBLEMS),
    },
)
def get_datasheet(
    expert_id: str,
    session: SessionDep,
    principal: OptionalPrincipal,
    version: Annotated[VersionNumber | None, Query()] = None,
) -> MarkdownResponse:
    with session.begin():
        expert = svc.get_expert(session=session, expert_id=expert_id)
        _servable(session, expert, principal)
        row = svc.get_version(session=session, expert=expert, version=version)
        svc.audit_review(
            session=session,
            expert=expert,
            principal=principal,
            artifact="datasheet",
            version=row.version,
        )
        return MarkdownResponse(row.datasheet, headers={"X-Agora-Version": str(row.version)})


@router.get(
    "/{expert_id}/weights",
    summary="Download a version's weights (streamed, HTTP Range, digest header)",
    response_class=StreamingResponse,
    operation_id="download_weights",
    responses={
        **download_responses(_WEIGHTS_MEDIA, head=False, extra_headers=_WEIGHTS_HEADERS),
        **problems(_ARTIFACT_PROBLEMS),
    },
)
@router.head(
    "/{expert_id}/weights",
    summary="Size, digest and range headers of a version's weights, no body",
    operation_id="head_weights",
    response_class=Response,
    responses={
        **download_responses(_WEIGHTS_MEDIA, head=True, extra_headers=_WEIGHTS_HEADERS),
        **problems(_ARTIFACT_PROBLEMS),
    },
)
def download_weights(
    *,
    request: Request,
    expert_id: str,
    runtime: RuntimeDep,
    session: SessionDep,
    principal: OptionalPrincipal,
    version: Annotated[VersionNumber | None, Query()] = None,
    range_header: Annotated[str | None, Header(alias="Range")] = None,
) -> Response:
    with session.begin():
        expert = svc.get_expert(session=session, expert_id=expert_id)
        _servable(session, expert, principal)
        row = svc.get_version(session=session, expert=expert, version=version)
        _servable(session, expert, principal, row.digest)
        if request.method == "GET":
            svc.audit_review(
                session=session,
                expert=expert,
                principal=principal,
                artifact="weights",
                version=row.version,
            )
        blob = get_blob(session=session, digest=row.digest)
    response = blob_response(
        runtime=runtime,
        digest=blob.digest,
        storage_key=blob.storage_key,
        size=blob.size,
        range_header=range_header,
        media_type="application/octet-stream",
        kind="expert",
        filename=f"{expert.id}-v{row.version}.safetensors",
        head=request.method == "HEAD",
    )
    response.headers["X-Agora-Version"] = str(row.version)
    if expert.status != svc.ACTIVE:
        # Served to this caller only (a quarantined expert's owner, staff): no shared cache.
        response.headers["Cache-Control"] = "private, no-store"
    return response
