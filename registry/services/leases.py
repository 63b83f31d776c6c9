"""The worker's calls on a leased job, each one transaction: lease, heartbeat, fail.

The queue's rules (one-statement claim, fencing, backoff) live in registry/services/jobs.py,
whose functions never commit; these are the write sequences the routes call, and they own
their transaction (registry/api/deps.py). Completing a job is registry/services/completion.py.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy.orm import Session

from registry.errors import PayloadTooLarge
from registry.services import jobs as jobs_svc
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
    worker: str,
    kinds: list[str] | None,
    lease_seconds: int | None,
) -> dict[str, Any] | None:
    """The leased job's view with its fencing token, or None when nothing is runnable."""
    name = jobs_svc.check_worker_name(worker)
    wanted = jobs_svc.check_kinds(kinds)
    seconds = jobs_svc.check_lease_seconds(lease_seconds, settings.job_lease_seconds)
    with session.begin():
        job = jobs_svc.lease(session=session, worker=name, kinds=wanted, lease_seconds=seconds)
        return None if job is None else jobs_svc.job_view(job, with_token=True)


def heartbeat_job(
    *, session: Session, job_id: str, fencing_token: int, progress: dict[str, Any] | None
) -> dict[str, Any]:
    """Extend the lease; the job's status and new expiry."""
    if progress is not None and len(json.dumps(progress)) > MAX_PROGRESS_BYTES:
        raise PayloadTooLarge("progress is limited to 4 KiB of JSON", code="progress_too_large")
    with session.begin():
        job = jobs_svc.heartbeat(
            session=session, job_id=job_id, fencing_token=fencing_token, progress=progress
        )
        return {
            "status": job.status,
            "lease_expires_at": job.lease_expires_at.isoformat() if job.lease_expires_at else None,
        }


def fail_job(
    *,
    session: Session,
    settings: Settings,
    job_id: str,
    fencing_token: int,
    error: str,
    retryable: bool,
    release: bool,
) -> dict[str, Any]:
    """Record a failure (retried with backoff, or final), or give the job back unfinished."""
    with session.begin():
        job = jobs_svc.fail(
            session=session,
            job_id=job_id,
            fencing_token=fencing_token,
            error=error,
            retryable=retryable,
            release=release,
            policy=job_policy(settings),
        )
        return jobs_svc.job_view(job, with_token=True)
