"""Experts and their immutable versions: validation, recording, listing, lookup."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from registry.db.models import BaseModel, Expert, ExpertVersion, utcnow
from registry.errors import BadRequest, Forbidden, NotFound, ValidationFailed
from registry.services.blobs import record_blob
from registry.services.ids import new_id
from registry.services.tokens import Principal
from registry.validation import parse_datasheet, validate_expert

STATUSES = ("active", "disabled")
MAX_PAGE = 100
DEFAULT_PAGE = 50


@dataclass(frozen=True)
class ValidatedExpert:
    """Everything a submission needs recorded, derived from bytes the server checked."""

    base_revision: str
    name: str
    domain: str
    license: str
    language: str
    layers: list[int]
    n_modules: int
    dtype: str
    datasheet_text: str
    datasheet_digest: str
    # The datasheet's sample passages: retrieval embeds them into the expert's vectors.
    samples: tuple[str, ...] = ()


def _text(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return "" if value is None else str(value)


def validate_submission(
    *,
    base: BaseModel,
    base_revision: str,
    weights_path: Path,
    datasheet: bytes,
    max_expert_bytes: int,
    max_datasheet_bytes: int,
) -> ValidatedExpert:
    """Strict validation of a staged expert against the base it claims (no DB writes)."""
    sheet = parse_datasheet(datasheet, max_bytes=max_datasheet_bytes)
    schema = base.config.get("expert_schema")
    if not isinstance(schema, dict):
        raise ValidationFailed(
            f"base revision {base.revision} has no expert_schema", code="base_without_schema"
        )
    info = validate_expert(
        weights_path,
        expert_schema=schema,
        base_revision=base_revision,
        max_bytes=max_expert_bytes,
    )
    return ValidatedExpert(
        base_revision=base_revision,
        name=_text(sheet.name),
        domain=_text(sheet.domain),
        license=_text(sheet.license),
        language=_text(sheet.language),
        layers=[int(i) for i in info.layers],
        n_modules=int(info.n_modules),
        dtype=str(info.dtype),
        datasheet_text=datasheet.decode("utf-8"),
        datasheet_digest=hashlib.sha256(datasheet).hexdigest(),
        samples=tuple(str(s) for s in sheet.samples),
    )


def find_stored_base(*, session: Session, revision: str) -> BaseModel:
    """The base a submission names; an unknown one is a validation failure, not a 404:
    the resource addressed (the expert collection) exists, the content is wrong."""
    base = session.get(BaseModel, revision) if revision else None
    if base is None:
        raise ValidationFailed(
            f"base_revision {revision!r} is not a stored base model", code="unknown_base_revision"
        )
    return base


def get_expert(*, session: Session, expert_id: str, for_update: bool = False) -> Expert:
    stmt = select(Expert).where(Expert.id == expert_id)
    if for_update:
        stmt = stmt.with_for_update()
    expert = session.scalars(stmt).one_or_none()
    if expert is None:
        raise NotFound(f"no expert {expert_id!r}", code="expert_not_found")
    return expert


def check_owner(*, expert: Expert, principal: Principal) -> None:
    if expert.owner != principal.name and not principal.is_admin:
        raise Forbidden(
            f"expert {expert.id} belongs to {expert.owner!r}; only its owner adds versions",
            code="not_owner",
        )


def record_version(
    *,
    session: Session,
    principal: Principal,
    expert_id: str | None,
    validated: ValidatedExpert,
    digest: str,
    size: int,
    storage_key: str,
) -> tuple[Expert, ExpertVersion]:
    """Insert the blob row, the expert (new) or lock it (existing), and a new version."""
    record_blob(session=session, digest=digest, size=size, storage_key=storage_key)
    now = utcnow()
    if expert_id is None:
        expert = Expert(
            id=new_id("ex"),
            owner=principal.name,
            status="active",
            latest_version=1,
            created_at=now,
            updated_at=now,
            name=validated.name,
            domain=validated.domain,
            license=validated.license,
            language=validated.language,
            base_revision=validated.base_revision,
        )
        session.add(expert)
    else:
        # Row lock on PostgreSQL: concurrent submissions of versions serialise here, so
        # version numbers are dense and never reused (SQLite serialises writers anyway).
        expert = get_expert(session=session, expert_id=expert_id, for_update=True)
        check_owner(expert=expert, principal=principal)
        expert.latest_version += 1
        expert.updated_at = now
        expert.name = validated.name
        expert.domain = validated.domain
        expert.license = validated.license
        expert.language = validated.language
        expert.base_revision = validated.base_revision
    session.flush()
    version = ExpertVersion(
        expert_id=expert.id,
        version=expert.latest_version,
        digest=digest,
        size=size,
        base_revision=validated.base_revision,
        layers=validated.layers,
        n_modules=validated.n_modules,
        dtype=validated.dtype,
        datasheet=validated.datasheet_text,
        datasheet_digest=validated.datasheet_digest,
        created_by=principal.name,
        created_at=now,
    )
    session.add(version)
    session.flush()
    return expert, version


def get_version(*, session: Session, expert: Expert, version: int | None) -> ExpertVersion:
    number = expert.latest_version if version is None else version
    row = session.get(ExpertVersion, (expert.id, number))
    if row is None:
        raise NotFound(f"expert {expert.id} has no version {number}", code="version_not_found")
    return row


def list_versions(*, session: Session, expert_id: str) -> list[ExpertVersion]:
    return list(
        session.scalars(
            select(ExpertVersion)
            .where(ExpertVersion.expert_id == expert_id)
            .order_by(ExpertVersion.version)
        )
    )


def encode_cursor(last_id: str) -> str:
    raw = json.dumps({"after": last_id}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        after = json.loads(raw)["after"]
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise BadRequest("cursor is not one this server issued", code="invalid_cursor") from exc
    if not isinstance(after, str):
        raise BadRequest("cursor is not one this server issued", code="invalid_cursor")
    return after


def list_experts(
    *,
    session: Session,
    base_revision: str | None,
    status: str,
    q: str | None,
    limit: int,
    cursor: str | None,
) -> tuple[list[Expert], str | None]:
    """Newest first, keyset-paginated on the time-ordered id (stable under inserts)."""
    if status not in STATUSES:
        raise BadRequest(f"status must be one of {', '.join(STATUSES)}", code="invalid_status")
    if not 1 <= limit <= MAX_PAGE:
        raise BadRequest(f"limit must be between 1 and {MAX_PAGE}", code="invalid_limit")
    stmt = select(Expert).where(Expert.status == status)
    if base_revision:
        stmt = stmt.where(Expert.base_revision == base_revision)
    if q:
        # Escape LIKE wildcards so a user's "%" or "_" is matched literally.
        escaped = q.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = f"%{escaped}%"
        stmt = stmt.where(
            or_(
                func.lower(Expert.domain).like(pattern, escape="\\"),
                func.lower(Expert.name).like(pattern, escape="\\"),
            )
        )
    if cursor:
        stmt = stmt.where(Expert.id < decode_cursor(cursor))
    rows = list(session.scalars(stmt.order_by(Expert.id.desc()).limit(limit + 1)))
    next_cursor = encode_cursor(rows[limit - 1].id) if len(rows) > limit else None
    return rows[:limit], next_cursor


def expert_view(expert: Expert) -> dict[str, Any]:
    return {
        "id": expert.id,
        "name": expert.name,
        "domain": expert.domain,
        "owner": expert.owner,
        "status": expert.status,
        "base_revision": expert.base_revision,
        "license": expert.license,
        "language": expert.language,
        "latest_version": expert.latest_version,
        "created_at": expert.created_at.isoformat(),
        "updated_at": expert.updated_at.isoformat(),
    }


def version_view(version: ExpertVersion) -> dict[str, Any]:
    return {
        "version": version.version,
        "digest": f"sha256:{version.digest}",
        "size": version.size,
        "base_revision": version.base_revision,
        "layers": version.layers,
        "n_modules": version.n_modules,
        "dtype": version.dtype,
        "created_at": version.created_at.isoformat(),
    }
