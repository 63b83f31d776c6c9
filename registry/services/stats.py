"""The registry at a glance: the counts the home page shows (docs/web.md).

One query per count, in the caller's transaction (never commits):

* base revisions stored;
* experts ``active`` (quarantined, disabled and withdrawn ones are not counted);
* compositions ``ready`` (pending, verifying and failed ones are not);
* workers seen in the last ``WORKER_WINDOW``: distinct worker names that leased (or
  heartbeated) a job still leased, or had a result accepted, in that window;
* jobs ``queued`` (waiting for a worker; a job backing off before a retry is queued too).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import Select, func, select, union
from sqlalchemy.orm import Session

from registry.db.models import BaseModel, Composition, Expert, Job, JobResult, utcnow
from registry.services.compositions import READY
from registry.services.experts import ACTIVE

WORKER_WINDOW = dt.timedelta(hours=1)


@dataclass(frozen=True)
class RegistryCounts:
    base_revisions: int
    active_experts: int
    ready_compositions: int
    workers_last_hour: int
    jobs_queued: int


def _count(session: Session, stmt: Select[int]) -> int:
    return int(session.scalar(stmt) or 0)


def _workers_seen(since: dt.datetime) -> Select[int]:
    """Distinct worker names with a lease taken or renewed, or a result accepted, since
    ``since`` (a lease's ``updated_at`` moves with each lease and heartbeat; a job that
    succeeded keeps its worker's name in ``job_results``)."""
    leasing = select(Job.lease_owner.label("worker")).where(
        Job.status == "leased", Job.lease_owner.is_not(None), Job.updated_at >= since
    )
    completing = select(JobResult.worker.label("worker")).where(
        JobResult.worker.is_not(None), JobResult.created_at >= since
    )
    names = union(leasing, completing).subquery()
    return select(func.count()).select_from(names)


def registry_counts(*, session: Session, now: dt.datetime | None = None) -> RegistryCounts:
    since = (now or utcnow()) - WORKER_WINDOW
    return RegistryCounts(
        base_revisions=_count(session, select(func.count()).select_from(BaseModel)),
        active_experts=_count(
            session, select(func.count()).select_from(Expert).where(Expert.status == ACTIVE)
        ),
        ready_compositions=_count(
            session,
            select(func.count()).select_from(Composition).where(Composition.status == READY),
        ),
        workers_last_hour=_count(session, _workers_seen(since)),
        jobs_queued=_count(
            session, select(func.count()).select_from(Job).where(Job.status == "queued")
        ),
    )
