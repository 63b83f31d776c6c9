"""SQLAlchemy 2 models of the registry.

Every blob (expert weights, base model files) is a row in ``blobs`` keyed by its sha256;
rows elsewhere point at blobs by foreign key, and the garbage collector finds unreferenced
blobs by walking those foreign keys (so tables added later are covered without edits).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC timestamps on every backend (SQLite hands back naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        assert isinstance(value, dt.datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Token(Base):
    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100), index=True)
    role: Mapped[str] = mapped_column(String(20))
    # The first characters of the secret, shown in listings so a user can tell tokens apart.
    prefix: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # A worker token whose outputs the operator vouches for (registry/services/workers.py).
    trusted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # A worker token suspended after too many refused results: refused on every worker
    # route until an admin lifts it. ``refusals`` counts consecutive refusals; an
    # accepted completion resets it.
    suspended_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    suspension_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    refusals: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))


class Blob(Base):
    __tablename__ = "blobs"

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    storage_key: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class BaseModel(Base):
    __tablename__ = "base_models"

    revision: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    config_digest: Mapped[str] = mapped_column(ForeignKey("blobs.digest"))
    tokenizer_digest: Mapped[str] = mapped_column(ForeignKey("blobs.digest"))
    weights_digest: Mapped[str] = mapped_column(ForeignKey("blobs.digest"))
    # The validated config.json, kept in the row so expert validation needs no blob read.
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_by: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Expert(Base):
    __tablename__ = "experts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    domain: Mapped[str] = mapped_column(Text)
    license: Mapped[str] = mapped_column(String(200))
    language: Mapped[str] = mapped_column(String(200))
    owner: Mapped[str] = mapped_column(String(100), index=True)
    status: Mapped[str] = mapped_column(String(24), index=True, default="active")
    base_revision: Mapped[str] = mapped_column(ForeignKey("base_models.revision"), index=True)
    latest_version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # ``withdrawn_by_lineage``: the disabled or withdrawn ancestor that withdrew it, and
    # the status it returns to once none does (registry/services/governance.py).
    withdrawn_cause: Mapped[str | None] = mapped_column(String(32), nullable=True)
    lineage_prior_status: Mapped[str | None] = mapped_column(String(24), nullable=True)


class ExpertVersion(Base):
    """One immutable upload of an expert; nothing ever updates these rows."""

    __tablename__ = "expert_versions"

    expert_id: Mapped[str] = mapped_column(ForeignKey("experts.id"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    digest: Mapped[str] = mapped_column(ForeignKey("blobs.digest"), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    base_revision: Mapped[str] = mapped_column(ForeignKey("base_models.revision"))
    layers: Mapped[list[int]] = mapped_column(JSON)
    n_modules: Mapped[int] = mapped_column(Integer)
    dtype: Mapped[str] = mapped_column(String(16))
    datasheet: Mapped[str] = mapped_column(Text)
    datasheet_digest: Mapped[str] = mapped_column(String(64))
    created_by: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class IdempotencyKey(Base):
    """A POST's stored outcome, replayed when the same token sends the same key again."""

    __tablename__ = "idempotency_keys"

    token_id: Mapped[int] = mapped_column(ForeignKey("tokens.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    method: Mapped[str] = mapped_column(String(10))
    path: Mapped[str] = mapped_column(String(500))
    # sha256 over the request's parsed content (field values and file digests), so a
    # retry that re-encodes the multipart body with a new boundary still matches.
    fingerprint: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int] = mapped_column(Integer)
    response_body: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ExpertVector(Base):
    """One retrieval vector of an expert's latest version, as made by one embedder.

    The primary key is the vector's id in the FAISS index, so every replica builds the same
    index from these rows. Vectors of several embedders may coexist (a rolling upgrade);
    an index only ever loads those of the embedder it runs.
    """

    __tablename__ = "expert_vectors"
    __table_args__ = (UniqueConstraint("expert_id", "embedder", "ordinal"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    expert_id: Mapped[str] = mapped_column(ForeignKey("experts.id"))
    version: Mapped[int] = mapped_column(Integer)
    embedder: Mapped[str] = mapped_column(String(100), index=True)
    # 0 is the mean of the sample passages; 1.. the centroids of their modes, if any.
    ordinal: Mapped[int] = mapped_column(Integer)
    dim: Mapped[int] = mapped_column(Integer)
    # float32, little-endian, unit L2 norm.
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class RetrievalState(Base):
    """One row: a counter bumped by every change that affects search (submit, disable,
    enable, re-embed). The bump is an UPDATE of this row, so writers serialise on it and
    versions become visible in commit order; replicas poll it to notice changes."""

    __tablename__ = "retrieval_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    version: Mapped[int] = mapped_column(BigInteger)


class RetrievalChange(Base):
    """Which expert changed at which counter value: a replica replays only these."""

    __tablename__ = "retrieval_changes"

    version: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    expert_id: Mapped[str] = mapped_column(ForeignKey("experts.id"), index=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ModerationAction(Base):
    """A moderator's disable or enable of an expert, with the reason given (append-only)."""

    __tablename__ = "moderation_actions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    expert_id: Mapped[str] = mapped_column(ForeignKey("experts.id"), index=True)
    action: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(100))
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ExpertReport(Base):
    """Someone's report of an expert, and a moderator's resolution of it
    (registry/services/reports.py; docs/governance.md, "Reports")."""

    __tablename__ = "expert_reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    expert_id: Mapped[str] = mapped_column(ForeignKey("experts.id"), index=True)
    reporter: Mapped[str] = mapped_column(String(100), index=True)
    reporter_token_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    reason: Mapped[str] = mapped_column(Text)
    evidence: Mapped[str] = mapped_column(Text, default="", server_default="")
    # open, dismissed, or disabled (resolved by disabling the expert).
    status: Mapped[str] = mapped_column(String(16), index=True, default="open")
    resolution: Mapped[str | None] = mapped_column(Text, nullable=True)
    resolved_by: Mapped[str | None] = mapped_column(String(100), nullable=True)
    resolved_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # The disable that resolved it (moderation_actions.id; a plain record).
    moderation_action: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Job(Base):
    """A unit of work leased by workers over HTTP (compositions, evaluations).

    ``attempts`` counts leases; ``fencing_token`` is drawn afresh (at random) by every
    lease, and only the current token, presented by the worker token that holds the lease
    (``lease_token_id``), may heartbeat, complete or fail the job, so a worker that lost
    its lease, or never had it, can change nothing. ``run_after`` holds a retry back until
    its backoff is over.
    """

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status_run_after", "status", "run_after"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(40), index=True)
    status: Mapped[str] = mapped_column(String(16))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    fencing_token: Mapped[int] = mapped_column(BigInteger, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_seconds: Mapped[int | None] = mapped_column(Integer, nullable=True)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # The token that holds the current lease: only it may heartbeat, fail or complete.
    lease_token_id: Mapped[int | None] = mapped_column(ForeignKey("tokens.id"), nullable=True)
    # A token that may not lease this job (a check must be run by another worker).
    exclude_token_id: Mapped[int | None] = mapped_column(ForeignKey("tokens.id"), nullable=True)
    run_after: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    composition_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    created_by: Mapped[str] = mapped_column(String(100), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class JobResult(Base):
    """The one accepted outcome of a job: the primary key makes a second one impossible."""

    __tablename__ = "job_results"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    fencing_token: Mapped[int] = mapped_column(BigInteger)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # The bearer token that completed the job (tokens.id; a plain record, not a constraint).
    token_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    result: Mapped[dict[str, Any]] = mapped_column(JSON)
    output_digest: Mapped[str | None] = mapped_column(ForeignKey("blobs.digest"), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Composition(Base):
    """A requested composition: its resolved inputs, then (once its job succeeded) the
    manifest and, for average and distill, the expert it produced."""

    __tablename__ = "compositions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    method: Mapped[str] = mapped_column(String(16))
    base_revision: Mapped[str] = mapped_column(ForeignKey("base_models.revision"))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    job_id: Mapped[str] = mapped_column(String(32))
    # The resolved inputs: expert refs (id, version, digest, size), weights, params.
    inputs: Mapped[dict[str, Any]] = mapped_column(JSON)
    manifest: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    expert_id: Mapped[str | None] = mapped_column(ForeignKey("experts.id"), nullable=True)
    created_by: Mapped[str] = mapped_column(String(100), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class CompositionExpert(Base):
    """Which expert versions a composition uses (moderation withdraws what names them)."""

    __tablename__ = "composition_experts"

    composition_id: Mapped[str] = mapped_column(ForeignKey("compositions.id"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    expert_id: Mapped[str] = mapped_column(ForeignKey("experts.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)


class ExpertParent(Base):
    """Lineage: an expert version averaged or distilled from other expert versions."""

    __tablename__ = "expert_parents"

    expert_id: Mapped[str] = mapped_column(ForeignKey("experts.id"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    parent_id: Mapped[str] = mapped_column(ForeignKey("experts.id"), primary_key=True, index=True)
    parent_version: Mapped[int] = mapped_column(Integer)
    weight: Mapped[float | None] = mapped_column(Float, nullable=True)


class Evaluation(Base):
    """Bits per byte of an expert (base + it) or a composition on one named text set."""

    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    expert_id: Mapped[str | None] = mapped_column(
        ForeignKey("experts.id"), nullable=True, index=True
    )
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    composition_id: Mapped[str | None] = mapped_column(
        ForeignKey("compositions.id"), nullable=True, index=True
    )
    text_set: Mapped[str] = mapped_column(String(200))
    bits_per_byte: Mapped[float] = mapped_column(Float)
    base_bits_per_byte: Mapped[float | None] = mapped_column(Float, nullable=True)
    tokens: Mapped[int] = mapped_column(BigInteger)
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_by: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ArrivalCheck(Base):
    """An arriving expert version's check: an ``evaluate`` job (purpose ``arrival``) on its
    own datasheet samples against the base, and what the registry decided from it
    (registry/services/arrival.py; docs/governance.md, "Checks on arrival")."""

    __tablename__ = "arrival_checks"

    expert_id: Mapped[str] = mapped_column(ForeignKey("experts.id"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), nullable=True, index=True)
    # pending, passed, flagged, failed, released (a moderator dismissed the flag), superseded.
    status: Mapped[str] = mapped_column(String(16))
    min_gain: Mapped[float] = mapped_column(Float)
    bits_per_byte: Mapped[float | None] = mapped_column(Float, nullable=True)
    base_bits_per_byte: Mapped[float | None] = mapped_column(Float, nullable=True)
    relative_change: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    report_id: Mapped[int | None] = mapped_column(
        ForeignKey("expert_reports.id"), nullable=True, index=True
    )
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    decided_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class ForgettingReport(Base):
    """A disable's proof of forgetting: an ``evaluate`` job (purpose ``forgetting``) that
    measures a composition that used the disabled expert (or the expert alone) with it,
    without it and the base, on its own samples and the other experts'
    (registry/services/forgetting.py; docs/governance.md, "Proof of forgetting")."""

    __tablename__ = "forgetting_reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    expert_id: Mapped[str] = mapped_column(ForeignKey("experts.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    # None: the expert alone (the base with it inserted).
    composition_id: Mapped[str | None] = mapped_column(ForeignKey("compositions.id"), nullable=True)
    method: Mapped[str] = mapped_column(String(16))
    without_method: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    # The disable that queued it (moderation_actions.id).
    moderation_action: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # pending, ready or failed.
    status: Mapped[str] = mapped_column(String(16), default="pending")
    results: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class AuditEvent(Base):
    """One entry of the audit log: a governance action (a submission, a disable, a token
    made or revoked, a worker suspended...), append-only and hash-chained
    (registry/services/audit.py; docs/governance.md, "Audit log"). On PostgreSQL,
    triggers refuse UPDATE, DELETE and TRUNCATE of the table."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # The entry's place in the chain: 1, 2, ... with no gaps (a gap is a deleted entry).
    seq: Mapped[int] = mapped_column(Integer, index=True, unique=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    actor: Mapped[str] = mapped_column(String(100), index=True)
    action: Mapped[str] = mapped_column(String(40), index=True)
    # What the action was done to: "expert:ex_...", "token:12".
    target: Mapped[str] = mapped_column(String(200), index=True)
    reason: Mapped[str] = mapped_column(Text, default="", server_default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)
    # sha256 hex of the previous entry ("0" * 64 before the first) and of this one.
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class TextSet(Base):
    """A named, dated set of texts a moderator uploaded (an evolving benchmark: this
    month's news), measured by monitoring runs (registry/services/monitoring.py;
    docs/governance.md, "Monitoring")."""

    __tablename__ = "text_sets"
    __table_args__ = (UniqueConstraint("name", "date", name="uq_text_sets_name_date"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100), index=True)
    # The set's own date, ISO YYYY-MM-DD (sorts as text), given by the moderator.
    date: Mapped[str] = mapped_column(String(10))
    texts: Mapped[list[str]] = mapped_column(JSON)
    n_texts: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(BigInteger)
    uploader: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class MonitorSchedule(Base):
    """Scheduled monitoring: one evaluation per active expert from ``not_before`` and,
    with ``every_hours``, again that long after each run's time (a chain through the job
    queue: docs/governance.md, "Monitoring")."""

    __tablename__ = "monitor_schedules"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    not_before: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    every_hours: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Which text sets each run measures: {"names": [...] or null, "limit": n or null}.
    text_sets: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_by: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    cancelled_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    cancelled_by: Mapped[str | None] = mapped_column(String(100), nullable=True)


class MonitorRun(Base):
    """One expert's monitoring evaluation (its ``evaluate`` job) and, once done, what the
    registry concluded: the own-domain change against the reference, the repetition of
    its continuations and the base's, and the flag it raised, if any."""

    __tablename__ = "monitor_runs"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    schedule_id: Mapped[int] = mapped_column(ForeignKey("monitor_schedules.id"), index=True)
    expert_id: Mapped[str] = mapped_column(ForeignKey("experts.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    run_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    # The own-domain reference: an earlier evaluation (evaluations.id), or none yet.
    reference_evaluation: Mapped[int | None] = mapped_column(Integer, nullable=True)
    own_bits_per_byte: Mapped[float | None] = mapped_column(Float, nullable=True)
    reference_bits_per_byte: Mapped[float | None] = mapped_column(Float, nullable=True)
    worsening: Mapped[float | None] = mapped_column(Float, nullable=True)
    repetition: Mapped[float | None] = mapped_column(Float, nullable=True)
    base_repetition: Mapped[float | None] = mapped_column(Float, nullable=True)
    report_id: Mapped[int | None] = mapped_column(
        ForeignKey("expert_reports.id"), nullable=True, index=True
    )
    completed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class WebSession(Base):
    """A signed-in browser (registry/web/sessions.py). The cookie holds a random id; this row
    holds its sha256, never the id nor the token: the token it acts as (by id), the CSRF
    secret its forms carry, and when it lapses. Sign-out deletes the row."""

    __tablename__ = "web_sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_id: Mapped[int] = mapped_column(ForeignKey("tokens.id"), index=True)
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), index=True)
