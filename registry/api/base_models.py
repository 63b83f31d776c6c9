"""Base model revisions: upload (admin), list, get, download files."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from sqlalchemy.orm import Session

from registry.api.common import store_upload
from registry.api.deps import RuntimeDep, SessionDep, require_roles
from registry.api.downloads import blob_response
from registry.api.openapi import BINARY, download_responses, problems
from registry.api.schemas import BaseModelListOut, BaseModelOut
from registry.api.uploads import ParsedForm, parse_multipart
from registry.runtime import Runtime
from registry.services import base_models as svc
from registry.services.blobs import get_blob
from registry.services.idempotency import IdempotentRequest, StoredResponse
from registry.services.tokens import Principal

router = APIRouter(prefix="/v1/base-models", tags=["base models"])

_UPLOAD_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["config", "tokenizer", "weights"],
                    "properties": {
                        "config": {"type": "string", "format": "binary"},
                        "tokenizer": {"type": "string", "format": "binary"},
                        "weights": {"type": "string", "format": "binary"},
                        "name": {"type": "string"},
                    },
                }
            }
        },
    }
}

_MEDIA = {"config": "application/json", "tokenizer": "application/json"}
# config and tokenizer are JSON objects; the weights are safetensors.
_MEDIA_TYPES: dict[str, dict[str, Any]] = {
    "application/json": {"type": "object"},
    "application/octet-stream": BINARY,
}


def _store(
    runtime: Runtime,
    session: Session,
    principal: Principal,
    form: ParsedForm,
    idem: IdempotentRequest,
) -> StoredResponse:
    return svc.upload_base_model(
        session=session,
        store=runtime.store,
        principal=principal,
        files=form.files,
        name=form.fields.get("name", "").strip(),
        idem=idem,
    )


@router.post(
    "",
    status_code=201,
    summary="Upload a base model revision (admin)",
    openapi_extra=_UPLOAD_DOC,
    responses={
        200: {"description": "identical files were already stored", "model": BaseModelOut},
        **problems(
            {
                415: "expected_multipart",
                422: "config_invalid, expert_schema_invalid, tokenizer_invalid, and the "
                "safetensors framing codes of docs/validation.md",
            }
        ),
    },
    response_model=BaseModelOut,
)
async def create_base_model(
    request: Request,
    runtime: RuntimeDep,
    session: SessionDep,
    principal: Annotated[Principal, Depends(require_roles("admin"))],
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONResponse:
    s = runtime.settings
    form = await parse_multipart(
        request,
        staging=runtime.staging,
        file_limits={
            "config": s.max_base_config_bytes,
            "tokenizer": s.max_base_tokenizer_bytes,
            "weights": s.max_base_weights_bytes,
        },
        field_names={"name"},
        field_limit=s.max_form_field_bytes,
        required_files=set(svc.BASE_FILES),
    )
    return await store_upload(
        request=request,
        runtime=runtime,
        session=session,
        principal=principal,
        form=form,
        idempotency_key=idempotency_key,
        kind="base_model",
        store=_store,
    )


@router.get("", summary="List base model revisions", response_model=BaseModelListOut)
def list_base_models(session: SessionDep) -> dict[str, Any]:
    with session.begin():
        return {
            "items": [
                svc.base_model_view(session=session, base=b)
                for b in svc.list_base_models(session=session)
            ]
        }


@router.get("/{revision}", summary="Get a base model revision", response_model=BaseModelOut)
def get_base_model(revision: str, session: SessionDep) -> dict[str, Any]:
    with session.begin():
        base = svc.get_base_model(session=session, revision=revision)
        return svc.base_model_view(session=session, base=base)


@router.get(
    "/{revision}/files/{field}",
    summary="Download config, tokenizer or weights (streamed, HTTP Range)",
    response_class=StreamingResponse,
    operation_id="download_base_file",
    responses=download_responses(_MEDIA_TYPES, head=False),
)
@router.head(
    "/{revision}/files/{field}",
    summary="Size, digest and range headers of a base file, no body",
    operation_id="head_base_file",
    response_class=Response,
    responses=download_responses(_MEDIA_TYPES, head=True),
)
def download_base_file(
    *,
    request: Request,
    revision: str,
    field: str,
    runtime: RuntimeDep,
    session: SessionDep,
    range_header: Annotated[str | None, Header(alias="Range")] = None,
) -> Response:
    with session.begin():
        base = svc.get_base_model(session=session, revision=revision)
        blob = get_blob(session=session, digest=svc.file_digest(base, field))
    return blob_response(
        runtime=runtime,
        digest=blob.digest,
        storage_key=blob.storage_key,
        size=blob.size,
        range_header=range_header,
        media_type=_MEDIA.get(field, "application/octet-stream"),
        kind="base_model",
        filename=svc.BASE_FILES[field],
        head=request.method == "HEAD",
    )
