"""Base model revisions: three immutable files, identified by the sha256 of their manifest.

``upload_base_model`` is the write sequence of ``POST /v1/base-models`` and owns its
transactions (registry/api/deps.py); the other functions take the caller's session and
never commit. Re-posting identical files answers 200 with the stored revision.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from registry.db.models import BaseModel, Blob
from registry.errors import NotFound, base_model_not_found
from registry.services.blobs import record_blob
from registry.services.idempotency import IdempotentRequest, StoredResponse, reserves_key
from registry.services.staged import UploadedFile
from registry.services.tokens import Principal
from registry.storage import BlobStore
from registry.validation import validate_base_config, validate_base_weights, validate_tokenizer

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
        raise base_model_not_found(revision)
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


@reserves_key
def upload_base_model(
    *,
    session: Session,
    store: BlobStore,
    principal: Principal,
    files: dict[str, UploadedFile],
    name: str,
    idem: IdempotentRequest,
) -> StoredResponse:
    """Validate the three staged files, commit their blobs, then record the revision in one
    transaction: 201; identical files already stored: 200 with the stored revision."""
    config = dict(validate_base_config(files["config"].read_bytes()).raw)
    validate_tokenizer(files["tokenizer"].read_bytes())
    validate_base_weights(files["weights"].path)
    revision = revision_id({field: files[field].sha256 for field in BASE_FILES})

    def existing_view(s: Session) -> StoredResponse | None:
        base = find_base_model(session=s, revision=revision)
        if base is None:
            return None
        return StoredResponse(200, base_model_view(session=s, base=base))

    with session.begin():
        # Re-posting identical files is a no-op answered 200, not a conflict.
        found = existing_view(session)
    if found is not None:
        already: StoredResponse = found
        return idem.commit_or_replay(session, lambda _s: already)

    # Blobs first, then the row: a crash in between leaves only unreferenced blobs.
    keys = {field: store.commit(files[field].path, files[field].sha256) for field in BASE_FILES}
    name = name or str(config.get("name") or f"base-{revision[:12]}")

    def write(s: Session) -> StoredResponse:
        base = create_base_model(
            session=s,
            revision=revision,
            name=name[:200],
            config=config,
            files={f: (files[f].sha256, files[f].size, keys[f]) for f in BASE_FILES},
            created_by=principal.name,
        )
        return StoredResponse(201, base_model_view(session=s, base=base))

    try:
        return idem.commit_or_replay(session, write)
    except IntegrityError:
        # Two admins posting the same revision at once: the loser answers like a re-post.
        session.rollback()
        with session.begin():
            found = existing_view(session)
        if found is None:
            raise
        return found
