"""The job queue: leases, heartbeats, fenced completion, retries with backoff, dead jobs.

A job is ``queued`` until a worker leases it (``leased``), then ends ``succeeded``,
``failed`` (the worker reported a permanent error) or ``dead`` (its attempts ran out:
retryable failures or leases that expired without a heartbeat). Every lease bumps
``attempts`` and draws a fresh random ``fencing_token`` (never sequential: it cannot be
guessed from another); heartbeat, complete and fail are accepted only with the current
token *and* from the bearer token that holds the lease (``lease_token_id``), so a worker
that lost its lease (paused, partitioned, killed and restarted) can change nothing, nor
can another worker that learned the fencing token; the fencing token is shown only to the
lease holder. The one accepted outcome is a row of ``job_results`` keyed by the job id: a
job is applied at most once, by construction.

A job may name a token that must not lease it (``exclude_token_id``): a check of a
worker's output is leased by a different worker.

Leasing claims one job in one statement: ``UPDATE jobs ... WHERE id = (SELECT id ...
FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING id`` on PostgreSQL, so concurrent workers never
wait on each other's rows; SQLite has a single writer (``BEGIN IMMEDIATE``, see
registry/db/engine.py) and ignores the locking clause.
"""

from __future__ import annotations

import datetime as dt
import hmac
import random
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, case, or_, select, update
from sqlalchemy.orm import Session

from registry.db.models import Composition, Job, JobResult, utcnow
from registry.errors import BadRequest, Conflict, Forbidden, NotFound
from registry.protocol import JOB_KINDS
from registry.services.ids import new_id

# Every kind a worker can run: one compose.<method> per method spec, and evaluate.
KINDS = JOB_KINDS
# ``cancelled``: an expert it consumes was disabled or withdrawn
# (registry/services/governance.py).
STATUSES = ("queued", "leased", "succeeded", "failed", "dead", "cancelled")
FINAL = ("succeeded", "failed", "dead", "cancelled")
MIN_LEASE_SECONDS = 2
MAX_LEASE_SECONDS = 3600
MAX_ERROR_CHARS = 4000
MAX_WORKER_NAME = 200
# Fencing tokens are drawn from [1, 2**53): exact as a JSON number in every client.
FENCING_LIMIT = 2**53


@dataclass(frozen=True)
class JobPolicy:
    lease_seconds: int
    max_attempts: int
    backoff_base_seconds: float
    backoff_max_seconds: float

    def backoff(self, attempts: int) -> dt.timedelta:
        """The wait before attempt ``attempts + 1``: exponential, capped, jittered to
        50-100% so retries of jobs that failed together do not return together."""
        delay = min(self.backoff_max_seconds, self.backoff_base_seconds * 2 ** max(0, attempts - 1))
        return dt.timedelta(seconds=delay * random.uniform(0.5, 1.0))


class LeaseLost(Conflict):
    """The fencing token is not the job's current one, or the job is no longer leased.
    The detail never names the current token."""

    def __init__(self, job: Job) -> None:
        super().__init__(
            f"job {job.id} is {job.status} and this fencing token is not its current lease's; "
            "this worker's lease is lost: stop working on it",
            code="lease_lost",
        )


class NotLeaseHolder(Forbidden):
    """The fencing token is current but the bearer token is not the one that leased the
    job (an admin token included): only the lease holder acts on a leased job."""

    def __init__(self, job: Job) -> None:
        super().__init__(
            f"job {job.id} is leased by another token: only the lease holder may act on it",
            code="not_lease_holder",
        )


def new_fencing_token() -> int:
    """A fresh random fencing token in [1, 2**53), from ``secrets``."""
    return secrets.randbelow(FENCING_LIMIT - 1) + 1


def create_job(
    *,
    session: Session,
    kind: str,
    payload: dict[str, Any],
    created_by: str,
    max_attempts: int,
    idempotency_key: str | None = None,
    composition_id: str | None = None,
) -> Job:
    if kind not in KINDS:
        raise BadRequest(f"unknown job kind {kind!r}", code="invalid_kind")
    now = utcnow()
    job = Job(
        id=new_id("job"),
        kind=kind,
        status="queued",
        payload=payload,
        attempts=0,
        max_attempts=max_attempts,
        fencing_token=0,
        run_after=now,
        idempotency_key=idempotency_key,
        composition_id=composition_id,
        created_by=created_by,
        created_at=now,
        updated_at=now,
    )
    session.add(job)
    session.flush()
    return job


def check_kinds(kinds: list[str] | None) -> list[str] | None:
    if kinds is None:
        return None
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise BadRequest(
            f"kinds must be a non-empty subset of {', '.join(KINDS)}"
            + (f"; unknown: {', '.join(unknown)}" if unknown else ""),
            code="invalid_kinds",
        )
    return sorted(set(kinds))


def check_lease_seconds(seconds: int | None, default: int) -> int:
    value = default if seconds is None else seconds
    if not MIN_LEASE_SECONDS <= value <= MAX_LEASE_SECONDS:
        raise BadRequest(
            f"lease_seconds must be between {MIN_LEASE_SECONDS} and {MAX_LEASE_SECONDS}",
            code="invalid_lease_seconds",
        )
    return value


def check_worker_name(worker: str) -> str:
    worker = worker.strip()
    if not worker or len(worker) > MAX_WORKER_NAME or not worker.isprintable():
        raise BadRequest(
            f"worker must be 1 to {MAX_WORKER_NAME} printable characters", code="invalid_worker"
        )
    return worker


def _end_compositions(session: Session, job_ids: list[str], now: dt.datetime) -> None:
    if job_ids:
        session.execute(
            update(Composition)
            .where(Composition.job_id.in_(job_ids), Composition.status == "pending")
            .values(status="failed", updated_at=now)
        )
        # A check of a quarantined output that ended so rejects the output
        # (registry/services/verification.py, which imports this module).
        from registry.services.verification import end_checks

        end_checks(session=session, job_ids=job_ids)
        # An arrival check that ended so flags its expert (registry/services/arrival.py).
        from registry.services.arrival import end_jobs

        end_jobs(session=session, job_ids=job_ids)


def reap_expired(*, session: Session, now: dt.datetime | None = None) -> list[str]:
    """Jobs whose last allowed lease expired become ``dead``; returns their ids."""
    now = now or utcnow()
    doomed = (
        select(Job.id)
        .where(
            Job.status == "leased",
            Job.lease_expires_at < now,
            Job.attempts >= Job.max_attempts,
        )
        .with_for_update(skip_locked=True)
    )
    ids = list(
        session.scalars(
            update(Job)
            .where(Job.id.in_(doomed.scalar_subquery()))
            .values(
                status="dead",
                error="the lease expired on its last allowed attempt (the worker died or hung)",
                lease_owner=None,
                lease_token_id=None,
                lease_expires_at=None,
                updated_at=now,
                finished_at=now,
            )
            .returning(Job.id),
        )
    )
    _end_compositions(session, ids, now)
    return ids


def lease(
    *,
    session: Session,
    worker: str,
    token_id: int,
    kinds: list[str] | None,
    lease_seconds: int,
    now: dt.datetime | None = None,
) -> Job | None:
    """Claim the oldest runnable job (queued and due, or leased with an expired lease) for
    the bearer token ``token_id``, skipping jobs whose ``exclude_token_id`` is that token."""
    now = now or utcnow()
    reap_expired(session=session, now=now)
    candidate = (
        select(Job.id)
        .where(
            or_(
                and_(Job.status == "queued", Job.run_after <= now),
                and_(
                    Job.status == "leased",
                    Job.lease_expires_at < now,
                    Job.attempts < Job.max_attempts,
                ),
            ),
            or_(Job.exclude_token_id.is_(None), Job.exclude_token_id != token_id),
        )
        .order_by(Job.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    if kinds is not None:
        candidate = candidate.where(Job.kind.in_(kinds))
    drawn = new_fencing_token()
    claimed = session.scalars(
        update(Job)
        .where(Job.id == candidate.scalar_subquery())
        .values(
            status="leased",
            attempts=Job.attempts + 1,
            # Never the token the previous lease had, however unlikely the draw.
            fencing_token=case(
                (Job.fencing_token == drawn, drawn % (FENCING_LIMIT - 1) + 1), else_=drawn
            ),
            lease_owner=worker,
            lease_token_id=token_id,
            lease_seconds=lease_seconds,
            lease_expires_at=now + dt.timedelta(seconds=lease_seconds),
            progress=None,
            updated_at=now,
        )
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    if claimed is None:
        return None
    job = session.get(Job, claimed, populate_existing=True)
    assert job is not None
    return job


def get_job(*, session: Session, job_id: str, for_update: bool = False) -> Job:
    stmt = select(Job).where(Job.id == job_id)
    if for_update:
        stmt = stmt.with_for_update()
    job = session.scalars(stmt.execution_options(populate_existing=True)).one_or_none()
    if job is None:
        raise NotFound(f"no job {job_id!r}", code="job_not_found")
    return job


def same_fencing_token(current: int, given: int) -> bool:
    """``current == given`` in constant time (a fencing token is a secret of its holder)."""
    if not 0 < given < FENCING_LIMIT or not 0 <= current < FENCING_LIMIT:
        return False
    return hmac.compare_digest(current.to_bytes(8, "big"), given.to_bytes(8, "big"))


def check_holder(job: Job, fencing_token: int, token_id: int) -> None:
    """The caller may act on the job's lease: the fencing token is current (else 409
    ``lease_lost``: a worker whose lease ended) and the caller's bearer token holds the
    lease (else 403 ``not_lease_holder``: someone who learned another lease's token)."""
    if job.status == "cancelled":
        # Its own code: the worker stops and nothing it sends is stored.
        raise Conflict(f"job {job.id} was {job.error}", code="job_cancelled")
    if job.status != "leased" or not same_fencing_token(job.fencing_token, fencing_token):
        raise LeaseLost(job)
    if job.lease_token_id is None or job.lease_token_id != token_id:
        raise NotLeaseHolder(job)


def heartbeat(
    *,
    session: Session,
    job_id: str,
    fencing_token: int,
    token_id: int,
    progress: dict[str, Any] | None,
    now: dt.datetime | None = None,
) -> Job:
    """Extend the lease by its length. Accepted while the token is current, even just
    after the expiry time: the token only changes when another worker leases the job."""
    now = now or utcnow()
    job = get_job(session=session, job_id=job_id, for_update=True)
    check_holder(job, fencing_token, token_id)
    job.lease_expires_at = now + dt.timedelta(seconds=job.lease_seconds or 60)
    if progress is not None:
        job.progress = progress
    job.updated_at = now
    session.flush()
    return job


def completion_target(
    *, session: Session, job_id: str, fencing_token: int, token_id: int
) -> Job | None:
    """Lock the job for completion. None when this very completion already happened (a
    worker retrying after a lost response, with the same bearer token): the caller
    replays the job as it is."""
    job = get_job(session=session, job_id=job_id, for_update=True)
    if job.status == "succeeded":
        accepted = session.get(JobResult, job.id)
        if accepted is not None and same_fencing_token(accepted.fencing_token, fencing_token):
            if accepted.token_id != token_id:
                raise NotLeaseHolder(job)
            return None
    check_holder(job, fencing_token, token_id)
    return job


def succeed(
    *,
    session: Session,
    job: Job,
    result: dict[str, Any],
    output_digest: str | None = None,
    now: dt.datetime | None = None,
) -> None:
    """Record the job's one result (the primary key of ``job_results`` forbids a second)."""
    now = now or utcnow()
    session.add(
        JobResult(
            job_id=job.id,
            fencing_token=job.fencing_token,
            worker=job.lease_owner,
            token_id=job.lease_token_id,
            result=result,
            output_digest=output_digest,
            created_at=now,
        )
    )
    job.status = "succeeded"
    job.result = result
    job.error = None
    job.lease_token_id = None
    job.lease_expires_at = None
    job.updated_at = now
    job.finished_at = now
    session.flush()


def fail(
    *,
    session: Session,
    job_id: str,
    fencing_token: int,
    token_id: int,
    error: str,
    retryable: bool,
    release: bool,
    policy: JobPolicy,
    now: dt.datetime | None = None,
) -> Job:
    now = now or utcnow()
    job = get_job(session=session, job_id=job_id, for_update=True)
    check_holder(job, fencing_token, token_id)
    job.lease_owner = None
    job.lease_token_id = None
    job.lease_expires_at = None
    job.updated_at = now
    job.progress = None
    if release:
        # A worker shutting down gives the job back: this lease does not count.
        job.status = "queued"
        job.attempts = max(0, job.attempts - 1)
        job.run_after = now
        session.flush()
        return job
    job.error = error[:MAX_ERROR_CHARS]
    if not retryable:
        job.status = "failed"
    elif job.attempts >= job.max_attempts:
        job.status = "dead"
    else:
        job.status = "queued"
        job.run_after = now + policy.backoff(job.attempts)
    if job.status in FINAL:
        job.finished_at = now
        _end_compositions(session, [job.id], now)
    session.flush()
    return job


def list_jobs(*, session: Session, status: str | None, kind: str | None, limit: int) -> list[Job]:
    stmt = select(Job)
    if status is not None:
        if status not in STATUSES:
            raise BadRequest(f"status must be one of {', '.join(STATUSES)}", code="invalid_status")
        stmt = stmt.where(Job.status == status)
    if kind is not None:
        stmt = stmt.where(Job.kind == kind)
    return list(session.scalars(stmt.order_by(Job.id.desc()).limit(limit)))


def holds_lease(job: Job, token_id: int | None) -> bool:
    """Whether the bearer token ``token_id`` holds the job's current lease."""
    return token_id is not None and job.status == "leased" and job.lease_token_id == token_id


def job_view(job: Job, *, viewer_token_id: int | None) -> dict[str, Any]:
    """The job as an API answer. ``fencing_token`` is shown only to the lease holder
    (``viewer_token_id`` is the reader's bearer token); everyone else sees null."""

    def iso(value: dt.datetime | None) -> str | None:
        return value.isoformat() if value is not None else None

    return {
        "id": job.id,
        "kind": job.kind,
        "status": job.status,
        "payload": job.payload,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "lease_owner": job.lease_owner,
        "lease_expires_at": iso(job.lease_expires_at),
        "fencing_token": job.fencing_token if holds_lease(job, viewer_token_id) else None,
        "progress": job.progress,
        "result": job.result,
        "error": job.error,
        "composition_id": job.composition_id,
        "created_by": job.created_by,
        "created_at": iso(job.created_at),
        "updated_at": iso(job.updated_at),
        "finished_at": iso(job.finished_at),
        "run_after": iso(job.run_after),
    }
