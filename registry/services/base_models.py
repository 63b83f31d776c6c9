"""Base model revisions: three immutable files, identified by the sha256 of their manifest."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.db.models import BaseModel, Blob
from registry.errors import NotFound
from registry.services.blobs import record_blob

# Multipart field -> file name in the revision manifest (contract A).
BASE_FILES = {
    "config": "config.json",
    "tokenizer": "tokenizer.json",
    "weights": "model.safetensors",
}


def revision_id(digests: dict[str, str]) -> str:
    """Contract A: sha256 hex of the canonical manifest of the three files' digests."""
    manifest = {BASE_FILES[field]: digests[field] for field in BASE_FILES}
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(canonical).hexdigest()


def find_base_model(*, session: Session, revision: str) -> BaseModel | None:
    return session.get(BaseModel, revision)


def get_base_model(*, session: Session, revision: str) -> BaseModel:
    base = find_base_model(session=session, revision=revision)
    if base is None:
        raise NotFound(f"no base model revision {revision!r}", code="base_model_not_found")
    return base


def create_base_model(
    *,
    session: Session,
    revision: str,
    name: str,
    config: dict[str, Any],
    files: dict[str, tuple[str, int, str]],
    created_by: str,
) -> BaseModel:
    """Record the committed blobs (field -> (digest, size, storage key)) and the revision."""
    for digest, size, key in files.values():
        record_blob(session=session, digest=digest, size=size, storage_key=key)
    base = BaseModel(
        revision=revision,
        name=name,
        config_digest=files["config"][0],
        tokenizer_digest=files["tokenizer"][0],
        weights_digest=files["weights"][0],
        config=config,
        created_by=created_by,
    )
    session.add(base)
    session.flush()
    return base


def list_base_models(*, session: Session) -> list[BaseModel]:
    return list(session.scalars(select(BaseModel).order_by(BaseModel.created_at.desc())))


def file_digest(base: BaseModel, field: str) -> str:
    if field not in BASE_FILES:
        raise NotFound(
            f"no base model file {field!r}; one of {', '.join(BASE_FILES)}", code="file_not_found"
        )
    digest: str = getattr(base, f"{field}_digest")
    return digest


def base_model_view(*, session: Session, base: BaseModel) -> dict[str, Any]:
    digests = {field: file_digest(base, field) for field in BASE_FILES}
    rows = session.execute(
        select(Blob.digest, Blob.size).where(Blob.digest.in_(list(digests.values())))
    )
    sizes = {digest: size for digest, size in rows}
    return {
        "revision": base.revision,
        "name": base.name,
        "files": {
            field: {"digest": f"sha256:{digest}", "size": sizes.get(digest, 0)}
            for field, digest in digests.items()
        },
        "expert_schema": base.config.get("expert_schema"),
        "created_at": base.created_at.isoformat(),
    }
