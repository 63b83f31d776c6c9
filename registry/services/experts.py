"""Experts and their immutable versions: submission, validation, recording, listing, lookup.

``submit_expert`` is the write sequence of ``POST /v1/experts`` and owns its transactions
(registry/api/deps.py); the other functions take the caller's session and never commit.

A submission repeated by its owner (the same weights, the same datasheet, the same base,
no ``expert_id``) is not a second expert: it answers 200 with the version already stored,
as a re-posted base model does, so retrieval never splits a weight between two copies.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from registry.db.models import BaseModel, Expert, ExpertVersion, utcnow
from registry.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    ValidationFailed,
    expert_not_found,
    version_not_found,
)
from registry.faults import crash_point
from registry.protocol.refs import INT32_MAX
from registry.services import audit, governance
from registry.services.base_models import get_base_model
from registry.services.blobs import record_blob
from registry.services.idempotency import IdempotentRequest, StoredResponse, reserves_key
from registry.services.ids import new_id
from registry.services.staged import UploadedFile
from registry.services.tokens import Principal
from registry.validation import parse_datasheet, validate_expert

if TYPE_CHECKING:
    from registry.runtime import Runtime

# An expert's states (docs/architecture.md, "Workers that lie"): ``active`` (listed,
# searchable, composable, served to everyone); ``quarantined`` (stored, awaiting a check,
# a second worker's or its check on arrival, registry/services/arrival.py:
# not listed, searched nor composed, its artifacts served only to ``may_read_quarantined``
# callers); ``disabled`` (withdrawn by a moderator); ``rejected`` (failed its check).
ACTIVE = "active"
QUARANTINED = "quarantined"
DISABLED = "disabled"
REJECTED = "rejected"
# Withdrawn by its owner, or because an ancestor is disabled or withdrawn
# (registry/services/governance.py; docs/governance.md, "States").
WITHDRAWN = governance.WITHDRAWN
WITHDRAWN_BY_LINEAGE = governance.WITHDRAWN_BY_LINEAGE
STATUSES = (ACTIVE, QUARANTINED, DISABLED, REJECTED, WITHDRAWN, WITHDRAWN_BY_LINEAGE)
MAX_PAGE = 100
# list_experts' orders: the id is time-ordered (registry/services/ids.py).
SORTS: dict[str, tuple[Any, ...]] = {
    "newest": (Expert.id.desc(),),
    "oldest": (Expert.id.asc(),),
    "name": (func.lower(Expert.name), Expert.id),
}
DEFAULT_PAGE = 50
# Audit log actions (registry/services/audit.py) of a submission.
SUBMIT_ACTION = "expert.submit"
REVIEW_ACTION = "expert.review_download"
NEW_VERSION_ACTION = "expert.new_version"


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


def get_expert(*, session: Session, expert_id: str, for_update: bool = False) -> Expert:
    stmt = select(Expert).where(Expert.id == expert_id)
    if for_update:
        # Read afresh, not from the session's identity map: an earlier transaction of this
        # request may have loaded the row before a concurrent upload added a version.
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    expert = session.scalars(stmt).one_or_none()
    if expert is None:
        raise expert_not_found(expert_id)
    return expert


def check_owner(*, expert: Expert, principal: Principal) -> None:
    if expert.owner != principal.name and not principal.is_admin:
        raise Forbidden(
            f"expert {expert.id} belongs to {expert.owner!r}; only its owner adds versions",
            code="not_owner",
        )


def may_read_quarantined(*, expert: Expert, principal: Principal | None) -> bool:
    """Who reads a quarantined expert's datasheet and weights: its owner (who asked for
    the composition that made it), moderators, admins and workers (a check downloads it)."""
    if principal is None:
        return False
    return principal.role in ("moderator", "admin", "worker") or principal.name == expert.owner


def check_artifacts_readable(*, expert: Expert, principal: Principal | None) -> None:
    """An active expert's artifacts are everyone's; a quarantined one's only
    ``may_read_quarantined`` callers' (409 ``expert_quarantined``); any other state's
    only moderators' and admins', for review (451 ``expert_disabled`` naming the cause
    for everyone else)."""
    if expert.status == ACTIVE:
        return
    if is_reviewer(principal) and expert.status != QUARANTINED:
        return
    if expert.status == QUARANTINED:
        if may_read_quarantined(expert=expert, principal=principal):
            return
        raise Conflict(
            f"expert {expert.id} is quarantined until its check has run (a second "
            "worker's, or its check on arrival); until then only its owner, moderators, "
            "admins and workers read it",
            code="expert_quarantined",
        )
    raise governance.unavailable(expert, what="its artifacts are withdrawn")


def is_reviewer(principal: Principal | None) -> bool:
    """Moderators and admins read withdrawn experts (their downloads are audited)."""
    return principal is not None and principal.role in ("moderator", "admin")


def audit_review(
    *, session: Session, expert: Expert, principal: Principal | None, artifact: str, version: int
) -> None:
    """A moderator's or admin's read of a withdrawn expert (its ``artifact``, the weights or
    the datasheet, through the API or its page) is an audit entry,
    ``expert.review_download`` (docs/governance.md). Nothing for an active or quarantined
    expert."""
    if principal is None or expert.status in (ACTIVE, QUARANTINED):
        return
    audit.append(
        session,
        actor=principal.name,
        action=REVIEW_ACTION,
        target=f"expert:{expert.id}",
        detail={
            "artifact": artifact,
            "version": version,
            "status": expert.status,
            "actor_token": principal.token_id,
        },
    )


def check_digest_not_disabled(*, session: Session, digest: str, expert_id: str | None) -> None:
    """451 ``digest_disabled`` when a disabled expert (other than ``expert_id``) carries
    these weights: a disable is not undone by uploading the same bytes again."""
    holder = governance.disabled_holder(session, digest)
    if holder is not None and holder.id != expert_id:
        raise governance.Withdrawn(
            f"these weights (sha256:{digest}) are those of disabled expert {holder.id}",
            code="digest_disabled",
            cause={"expert_id": holder.id, "status": holder.status},
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
    status: str = ACTIVE,
    expected_version: int | None = None,
) -> tuple[Expert, ExpertVersion]:
    """Insert the blob row, the expert (new, in ``status``) or lock it (existing), and a
    new version (``expected_version``: the number it must get, else 409)."""
    record_blob(session=session, digest=digest, size=size, storage_key=storage_key)
    now = utcnow()
    if expert_id is None:
        expert = Expert(
            id=new_id("ex"),
            owner=principal.name,
            status=status,
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
        check_next_version(expert=expert, version=expected_version)
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


def parse_version_field(raw: str | None, *, expert_id: str | None) -> int | None:
    """The optional ``version`` form field of a submission: the number the new version
    must get (400 ``invalid_version`` unless 1 to 2^31-1, and 1 for a new expert)."""
    text = (raw or "").strip()
    if not text:
        return None
    if not (text.isascii() and text.isdigit() and len(text) <= 10) or not (
        1 <= int(text) <= INT32_MAX
    ):
        raise BadRequest(
            f"version must be a whole number from 1 to {INT32_MAX}", code="invalid_version"
        )
    if expert_id is None and int(text) != 1:
        raise BadRequest(
            "a new expert starts at version 1; give expert_id to add a later version",
            code="invalid_version",
        )
    return int(text)


def check_next_version(*, expert: Expert, version: int | None) -> None:
    """409 ``version_conflict`` when an upload names the version it must become and the
    expert's next version is another one: a concurrent upload took it first."""
    if version is None or version == expert.latest_version + 1:
        return
    raise Conflict(
        f"expert {expert.id} is at version {expert.latest_version}, so this upload cannot "
        f"become version {version}; submit again as version {expert.latest_version + 1}",
        code="version_conflict",
    )


def lock_resubmission(*, session: Session, owner: str, digest: str, datasheet_digest: str) -> None:
    """Serialise identical submissions of one owner until the transaction ends, so two
    racing ones cannot both find no stored version and make two experts: on PostgreSQL a
    transaction-scoped advisory lock (the second, once the first committed, finds its
    version); SQLite's ``BEGIN IMMEDIATE`` serialises every writer already."""
    if session.get_bind().dialect.name != "postgresql":
        return
    name = hashlib.sha256(f"{owner}\0{digest}\0{datasheet_digest}".encode()).digest()
    lock_id = int.from_bytes(name[:8], "big", signed=True)
    session.execute(select(func.pg_advisory_xact_lock(lock_id)))


def find_resubmission(
    *, session: Session, owner: str, base_revision: str, digest: str, datasheet_digest: str
) -> tuple[Expert, ExpertVersion] | None:
    """The version ``owner`` already stored with these weights and this datasheet (the
    oldest, should earlier code have made copies), or None."""
    row = session.execute(
        select(Expert, ExpertVersion)
        .join(ExpertVersion, ExpertVersion.expert_id == Expert.id)
        .where(
            Expert.owner == owner,
            ExpertVersion.digest == digest,
            ExpertVersion.datasheet_digest == datasheet_digest,
            ExpertVersion.base_revision == base_revision,
        )
        .order_by(Expert.id, ExpertVersion.version)
        .limit(1)
    ).one_or_none()
    return None if row is None else (row[0], row[1])


def submitted_view(expert: Expert, version: ExpertVersion) -> dict[str, Any]:
    return {
        "id": expert.id,
        "version": version.version,
        "digest": f"sha256:{version.digest}",
        "status": expert.status,
    }


@reserves_key
def submit_expert(
    *,
    session: Session,
    runtime: Runtime,
    principal: Principal,
    weights: UploadedFile,
    datasheet: UploadedFile,
    base_revision: str,
    expert_id: str | None,
    idem: IdempotentRequest,
    version: int | None = None,
) -> StoredResponse:
    """Validate the staged files, commit the weights blob, then record the expert (or its
    new version), its retrieval vectors and its audit entry in one transaction: 201. The
    owner's repeat of a stored version (no ``expert_id``): 200 with that version, nothing
    written.
    ``version``: the number the new version must get (409 ``version_conflict`` if a
    concurrent upload took it). The crash points are registry/faults.py's."""
    crash_point("upload.after_staging")
    sheet = datasheet.read_bytes()
    sheet_digest = hashlib.sha256(sheet).hexdigest()

    def repeated(s: Session) -> StoredResponse | None:
        if expert_id is not None:
            return None
        found = find_resubmission(
            session=s,
            owner=principal.name,
            base_revision=base_revision,
            digest=weights.sha256,
            datasheet_digest=sheet_digest,
        )
        return None if found is None else StoredResponse(200, submitted_view(*found))

    with session.begin():
        base = get_base_model(session=session, revision=base_revision)
        if expert_id is not None:
            # Refuse someone else's expert before any byte is committed to storage.
            current = get_expert(session=session, expert_id=expert_id)
            check_owner(expert=current, principal=principal)
            check_next_version(expert=current, version=version)
        check_digest_not_disabled(session=session, digest=weights.sha256, expert_id=None)
        again = repeated(session)
    if again is not None:
        already: StoredResponse = again
        return idem.commit_or_replay(session, lambda _s: already)
    validated = validate_submission(
        base=base,
        base_revision=base_revision,
        weights_path=weights.path,
        datasheet=sheet,
        max_expert_bytes=runtime.settings.max_expert_bytes,
        max_datasheet_bytes=runtime.settings.max_datasheet_bytes,
    )
    crash_point("upload.after_validation")
    # Embedded before the transaction (the embedder is the slow part), stored in
    # it: an accepted version always has its retrieval vectors.
    vectors = runtime.retrieval.vectors_for_samples(validated.samples)
    # The blob is committed before the row: a failure in between leaves an orphan blob
    # for the garbage collector, never a row that names missing bytes.
    key = runtime.store.commit(weights.path, weights.sha256)
    crash_point("upload.after_blob_commit")

    def write(s: Session) -> StoredResponse:
        if expert_id is None:
            lock_resubmission(
                session=s,
                owner=principal.name,
                digest=weights.sha256,
                datasheet_digest=sheet_digest,
            )
        # A disable committed while this one validated.
        check_digest_not_disabled(session=s, digest=weights.sha256, expert_id=None)
        # The same repeat, committed by a concurrent request while this one validated.
        raced = repeated(s)
        if raced is not None:
            return raced
        expert, row = record_version(
            session=s,
            principal=principal,
            expert_id=expert_id,
            validated=validated,
            digest=weights.sha256,
            size=weights.size,
            storage_key=key,
            expected_version=version,
        )
        runtime.retrieval.record_vectors(
            session=s, expert_id=expert.id, version=row.version, vectors=vectors
        )
        # Quarantined until its check on arrival (registry/services/arrival.py, which
        # imports this module).
        from registry.services import arrival

        arrival.start(
            session=s,
            settings=runtime.settings,
            expert=expert,
            version=row,
            created_by=principal.name,
            submitter_token_id=principal.token_id,
        )
        audit.append(
            s,
            actor=principal.name,
            action=SUBMIT_ACTION if expert_id is None else NEW_VERSION_ACTION,
            target=f"expert:{expert.id}",
            detail={
                "version": row.version,
                "digest": f"sha256:{row.digest}",
                "datasheet_digest": f"sha256:{row.datasheet_digest}",
                "base_revision": row.base_revision,
                "name": expert.name,
                "actor_token": principal.token_id,
            },
        )
        crash_point("upload.in_row_transaction")
        return StoredResponse(201, submitted_view(expert, row))

    response = idem.commit_or_replay(session, write)
    crash_point("upload.after_row_commit")
    # Committed: this replica's index takes the new version in place, before answering.
    runtime.retrieval.sync()
    return response


def get_version(*, session: Session, expert: Expert, version: int | None) -> ExpertVersion:
    number = expert.latest_version if version is None else version
    row = session.get(ExpertVersion, (expert.id, number))
    if row is None:
        raise version_not_found(expert.id, number, expert.latest_version)
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


_CURSOR_ID = re.compile(r"[a-z]{1,8}_[0-9a-z]{1,64}")


def decode_cursor(cursor: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        after = json.loads(raw)["after"]
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise BadRequest("cursor is not one this server issued", code="invalid_cursor") from exc
    # An id (registry/services/ids.py): anything else, a NUL or a lone surrogate included,
    # never reaches the query.
    if not isinstance(after, str) or not _CURSOR_ID.fullmatch(after):
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
    license: str | None = None,
    language: str | None = None,
    sort: str = "newest",
    offset: int = 0,
) -> tuple[list[Expert], str | None]:
    """Newest first, keyset-paginated on the time-ordered id (stable under inserts).
    The web pages (docs/web.md) also filter by ``license`` (exact, any case) and
    ``language`` (one of the expert's languages), sort ``oldest`` or by ``name``, and page
    by ``offset``; a cursor pages the ``newest`` order only."""
    if status not in STATUSES:
        raise BadRequest(f"status must be one of {', '.join(STATUSES)}", code="invalid_status")
    if not 1 <= limit <= MAX_PAGE:
        raise BadRequest(f"limit must be between 1 and {MAX_PAGE}", code="invalid_limit")
    if sort not in SORTS:
        raise BadRequest(f"sort must be one of {', '.join(SORTS)}", code="invalid_sort")
    if cursor and sort != "newest":
        raise BadRequest("a cursor pages the newest-first order only", code="invalid_cursor")
    stmt = _filtered(select(Expert).where(Expert.status == status), license, language)
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
    stmt = stmt.order_by(*SORTS[sort]).offset(offset).limit(limit + 1)
    rows = list(session.scalars(stmt))
    next_cursor = encode_cursor(rows[limit - 1].id) if len(rows) > limit else None
    return rows[:limit], next_cursor


def _like(text: str) -> str:
    """``text`` for LIKE, its wildcards matched literally (escape character ``\\``)."""
    return text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _filtered(stmt: Any, license: str | None, language: str | None) -> Any:
    if license:
        stmt = stmt.where(func.lower(Expert.license) == license.lower())
    if language:
        # Stored as the datasheet's languages joined with ", " (validate_submission).
        lang = _like(language)
        column = func.lower(Expert.language)
        stmt = stmt.where(
            or_(
                column == language.lower(),
                column.like(f"{lang}, %", escape="\\"),
                column.like(f"%, {lang}", escape="\\"),
                column.like(f"%, {lang}, %", escape="\\"),
            )
        )
    return stmt


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
