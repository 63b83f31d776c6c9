"""The worker's calls on a leased job, each one transaction: lease, heartbeat, fail.

The queue's rules (one-statement claim, fencing, backoff) live in registry/services/jobs.py,
whose functions never commit; these are the write sequences the routes call, and they own
their transaction (registry/api/deps.py). Completing a job is registry/services/completion.py.

Each takes the caller's bearer token (``Principal``): the lease records it, and only it may
heartbeat or fail the job. An attempt by another token that knows the current fencing
token (403 ``not_lease_holder``) counts as a refusal of that token
(registry/services/workers.py), recorded in its own transaction since the request's
rolls back.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy.orm import Session

from registry.errors import PayloadTooLarge
from registry.services import jobs as jobs_svc
from registry.services import workers
from registry.services.tokens import Principal
from registry.settings import Settings

MAX_PROGRESS_BYTES = 4096


def job_policy(settings: Settings) -> jobs_svc.JobPolicy:
    return jobs_svc.JobPolicy(
        lease_seconds=settings.job_lease_seconds,
        max_attempts=settings.job_max_attempts,
        backoff_base_seconds=settings.job_backoff_base_seconds,
        backoff_max_seconds=settings.job_backoff_max_seconds,
    )


def lease_job(
    *,
    session: Session,
    settings: Settings,
    principal: Principal,
    worker: str,
    kinds: list[str] | None,
    lease_seconds: int | None,
) -> dict[str, Any] | None:
    """The leased job's view with its fencing token, or None when nothing is runnable."""
    name = jobs_svc.check_worker_name(worker)
    wanted = jobs_svc.check_kinds(kinds)
    seconds = jobs_svc.check_lease_seconds(lease_seconds, settings.job_lease_seconds)
    with session.begin():
        job = jobs_svc.lease(
            session=session,
            worker=name,
            token_id=principal.token_id,
            kinds=wanted,
            lease_seconds=seconds,
        )
        return None if job is None else jobs_svc.job_view(job, viewer_token_id=principal.token_id)


def refused_holder(
    *, session: Session, settings: Settings, principal: Principal, exc: jobs_svc.NotLeaseHolder
) -> None:
    """Count a ``not_lease_holder`` answer against the token, in its own transaction."""
    workers.record_refusal_now(
        session=session,
        token_id=principal.token_id,
        reason=exc.detail,
        threshold=settings.worker_suspend_after_refusals,
    )


def heartbeat_job(
    *,
    session: Session,
    settings: Settings,
    principal: Principal,
    job_id: str,
    fencing_token: int,
    progress: dict[str, Any] | None,
) -> dict[str, Any]:
    """Extend the lease; the job's status and new expiry."""
    if progress is not None and len(json.dumps(progress)) > MAX_PROGRESS_BYTES:
        raise PayloadTooLarge("progress is limited to 4 KiB of JSON", code="progress_too_large")
    try:
        with session.begin():
            job = jobs_svc.heartbeat(
                session=session,
                job_id=job_id,
                fencing_token=fencing_token,
                token_id=principal.token_id,
                progress=progress,
            )
            expires = job.lease_expires_at
            return {
                "status": job.status,
                "lease_expires_at": expires.isoformat() if expires else None,
            }
    except jobs_svc.NotLeaseHolder as exc:
        refused_holder(session=session, settings=settings, principal=principal, exc=exc)
        raise


def fail_job(
    *,
    session: Session,
    settings: Settings,
    principal: Principal,
    job_id: str,
    fencing_token: int,
    error: str,
    retryable: bool,
    release: bool,
) -> dict[str, Any]:
    """Record a failure (retried with backoff, or final), or give the job back unfinished."""
    try:
        with session.begin():
            job = jobs_svc.fail(
                session=session,
                job_id=job_id,
                fencing_token=fencing_token,
                token_id=principal.token_id,
                error=error,
                retryable=retryable,
                release=release,
                policy=job_policy(settings),
            )
            return jobs_svc.job_view(job, viewer_token_id=principal.token_id)
    except jobs_svc.NotLeaseHolder as exc:
        refused_holder(session=session, settings=settings, principal=principal, exc=exc)
        raise
