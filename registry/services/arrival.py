"""Checks on arrival: a submitted expert version is measured before anyone else uses it.

With ``arrival_checks`` on (the default), a submission (``POST /v1/experts``, a new
expert or a new version) is recorded in one transaction with:

* the expert ``quarantined`` (not listed, searched nor composed; its files served only to
  its owner, moderators, admins and workers), whatever version it served before: a new
  version replaces the latest at once, so the expert as a whole waits for the check;
* an ``evaluate`` job (``EvaluatePayload.purpose`` ``arrival``) that scores the version,
  base plus expert against the base alone, on its own datasheet samples (text set
  ``samples``), and a row of ``arrival_checks`` naming it (``pending``).

The job's completion (registry/services/completion.py) hands its scores here
(``on_result``): when the version's bits per byte on its samples is below the base's by
more than ``arrival_min_gain`` (relative: ``(expert - base) / base < -min_gain``) the check
``passed`` and the expert becomes ``active``; otherwise it is ``flagged``: the expert
stays quarantined and the registry files a report into the moderators' queue with the
numbers (``reports.flag``). A job that ends ``failed`` or ``dead`` flags it the same way
with the error (``end_jobs``, called by the queue). A moderator who dismisses that report
releases the expert to ``active`` (``on_dismiss``); one who resolves it with ``disable``
disables it. Only the expert's latest version decides: the check of an older version
still pending when a newer one arrives is ``superseded``.

An expert in a state of its own (``disabled``, ``rejected``) keeps it; a withdrawn one
(by its owner or its lineage) returns to ``quarantined`` instead of ``active`` while its
latest version's check is not passed. The states and the API: docs/governance.md,
"Checks on arrival". The functions take the caller's session and never commit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import event, select
from sqlalchemy.orm import Session

from registry.db.models import ArrivalCheck, Expert, ExpertVersion, Job, ModerationAction, utcnow
from registry.protocol import EVALUATE_KIND, TextSetScore, relative_change
from registry.retrieval import store as retrieval_store
from registry.services import audit, evaluations, governance, reports
from registry.services import experts as expert_svc
from registry.services import jobs as jobs_svc
from registry.services.compositions import ResolvedExpert, samples_of
from registry.settings import Settings

if TYPE_CHECKING:
    from registry.runtime import Runtime

PURPOSE = "arrival"
# The one text set an arrival check scores: the version's datasheet samples.
TEXT_SET = "samples"
PENDING = "pending"
PASSED = "passed"
FLAGGED = "flagged"
FAILED = "failed"
RELEASED = "released"
SUPERSEDED = "superseded"
STATES = (PENDING, PASSED, FLAGGED, FAILED, RELEASED, SUPERSEDED)
ACTOR = "registry"
# moderation_actions rows (and audit actions) of the status changes made here.
ACTIVATE_ACTION = "arrival_pass"
RELEASE_ACTION = "arrival_release"
# The statuses a withdrawn expert returns to (``lineage_prior_status``).
_WITHDRAWN = (governance.WITHDRAWN, governance.WITHDRAWN_BY_LINEAGE)


def start(
    *,
    session: Session,
    settings: Settings,
    expert: Expert,
    version: ExpertVersion,
    created_by: str,
    submitter_token_id: int | None = None,
) -> ArrivalCheck | None:
    """Quarantine ``expert`` and queue its new ``version``'s check, in the submission's
    transaction; None (nothing done) with ``arrival_checks`` off. The submitting token
    (``submitter_token_id``) may not lease the check: a worker does not judge its own."""
    if not settings.arrival_checks:
        return None
    _hold(session, expert)
    now = utcnow()
    for older in session.scalars(
        select(ArrivalCheck).where(
            ArrivalCheck.expert_id == expert.id, ArrivalCheck.status == PENDING
        )
    ):
        older.status = SUPERSEDED
        older.decided_at = now
    texts = [text for text in samples_of(version) if text.strip()]
    row = ArrivalCheck(
        expert_id=expert.id,
        version=version.version,
        status=PENDING,
        min_gain=settings.arrival_min_gain,
        created_at=now,
    )
    session.add(row)
    if not texts:
        # Nothing to measure it on (a datasheet accepted under older rules): a moderator
        # decides.
        _flag(session, row, error="its datasheet has no samples to measure it on")
        return row
    job = jobs_svc.create_job(
        session=session,
        kind=EVALUATE_KIND,
        payload=evaluations.evaluate_payload(
            text_sets={TEXT_SET: texts},
            expert=ResolvedExpert(expert=expert, version=version),
            purpose=PURPOSE,
        ),
        created_by=created_by,
        max_attempts=settings.job_max_attempts,
    )
    job.exclude_token_id = submitter_token_id
    row.job_id = job.id
    session.flush()
    return row


def resume(*, session: Session, expert: Expert) -> Job | None:
    """Queue again the latest version's check when a withdrawal cancelled its job and the
    expert is back awaiting it (an owner's restore): the same payload and attempts. None
    when there is nothing to resume."""
    row = latest_check(session=session, expert_id=expert.id)
    if row is None or row.status != PENDING or row.job_id is None:
        return None
    waiting = expert.status == expert_svc.QUARANTINED or (
        expert.status in _WITHDRAWN and expert.lineage_prior_status == expert_svc.QUARANTINED
    )
    cancelled = session.get(Job, row.job_id)
    if not waiting or cancelled is None or cancelled.status != governance.CANCELLED:
        return None
    job = jobs_svc.create_job(
        session=session,
        kind=cancelled.kind,
        payload=dict(cancelled.payload),
        created_by=cancelled.created_by,
        max_attempts=cancelled.max_attempts,
    )
    job.exclude_token_id = cancelled.exclude_token_id
    row.job_id = job.id
    session.flush()
    return job


def passes(change: float | None, min_gain: float) -> bool:
    """Whether a relative change of bits per byte against the base, ``(expert - base) /
    base``, helps by more than ``min_gain`` (None, no base to compare with: it does not)."""
    return change is not None and change < -min_gain


def on_result(
    *,
    session: Session,
    runtime: Runtime,
    job: Job,
    checked: Mapping[str, TextSetScore],
) -> ArrivalCheck | None:
    """Apply an arrival job's scores (in its completion's transaction): pass or flag."""
    row = session.scalars(
        select(ArrivalCheck).where(ArrivalCheck.job_id == job.id).with_for_update()
    ).one_or_none()
    score = checked.get(TEXT_SET)
    if row is None or row.status != PENDING or score is None:
        return row
    row.bits_per_byte = score.bits_per_byte
    row.base_bits_per_byte = score.base_bits_per_byte
    row.relative_change = relative_change(score.bits_per_byte, score.base_bits_per_byte)
    row.min_gain = runtime.settings.arrival_min_gain
    row.decided_at = utcnow()
    if not passes(row.relative_change, row.min_gain):
        _flag(session, row, error=None)
        return row
    row.status = PASSED
    expert = expert_svc.get_expert(session=session, expert_id=row.expert_id, for_update=True)
    if _release(
        session,
        expert,
        action=ACTIVATE_ACTION,
        actor=ACTOR,
        reason=f"arrival check job {job.id} passed: {_summary(row)}",
        detail={"job": job.id, **numbers_of(row)},
    ):
        # This replica's index takes the expert once the completion commits, before the
        # worker hears back (other replicas at their next poll).
        event.listen(session, "after_commit", lambda _s: runtime.retrieval.sync(), once=True)
    return row


def end_jobs(*, session: Session, job_ids: Sequence[str]) -> None:
    """Arrival jobs among ``job_ids`` that ended ``failed`` or ``dead``: their version is
    flagged with the error and stays quarantined."""
    if not job_ids:
        return
    rows = session.execute(
        select(ArrivalCheck, Job.status, Job.error)
        .join(Job, Job.id == ArrivalCheck.job_id)
        .where(
            ArrivalCheck.job_id.in_(list(job_ids)),
            ArrivalCheck.status == PENDING,
            Job.status.in_(("failed", "dead")),
        )
    ).all()
    for row, status, error in rows:
        row.decided_at = utcnow()
        _flag(session, row, error=f"job {row.job_id} ended {status}: {error or 'no error given'}")


def on_dismiss(*, session: Session, report_id: int, actor: str, actor_token: int | None) -> None:
    """A moderator dismissed report ``report_id``: when it flagged an arrival check, the
    version is released (its expert becomes active, if it is still the latest)."""
    row = session.scalars(
        select(ArrivalCheck).where(ArrivalCheck.report_id == report_id).with_for_update()
    ).one_or_none()
    if row is None or row.status not in (FLAGGED, FAILED):
        return
    row.status = RELEASED
    row.decided_at = utcnow()
    expert = expert_svc.get_expert(session=session, expert_id=row.expert_id, for_update=True)
    if row.version != expert.latest_version:
        return
    _release(
        session,
        expert,
        action=RELEASE_ACTION,
        actor=actor,
        reason=f"report {report_id} dismissed: version {row.version} released",
        detail={"report": report_id, "actor_token": actor_token, **numbers_of(row)},
    )


def _hold(session: Session, expert: Expert) -> None:
    """``active`` becomes ``quarantined``; a withdrawn expert returns to ``quarantined``
    rather than ``active``; a state of its own (disabled, rejected) stays."""
    if expert.status == expert_svc.ACTIVE:
        expert.status = expert_svc.QUARANTINED
        expert.updated_at = utcnow()
        session.flush()
        retrieval_store.bump(session=session, expert_id=expert.id)
    elif expert.status in _WITHDRAWN and expert.lineage_prior_status in (None, expert_svc.ACTIVE):
        expert.lineage_prior_status = expert_svc.QUARANTINED
        session.flush()


def _release(
    session: Session,
    expert: Expert,
    *,
    action: str,
    actor: str,
    reason: str,
    detail: dict[str, Any],
) -> bool:
    """The reverse of ``_hold``, recorded (moderation action and audit entry); True when
    the expert became active."""
    now = utcnow()
    became_active = expert.status == expert_svc.QUARANTINED
    if became_active:
        expert.status = expert_svc.ACTIVE
    elif expert.status in _WITHDRAWN and expert.lineage_prior_status == expert_svc.QUARANTINED:
        expert.lineage_prior_status = expert_svc.ACTIVE
    else:
        return False
    expert.updated_at = now
    session.add(
        ModerationAction(expert_id=expert.id, action=action, reason=reason, actor=actor, at=now)
    )
    session.flush()
    if became_active:
        retrieval_store.bump(session=session, expert_id=expert.id)
    audit.append(
        session,
        actor=actor,
        action=f"expert.{action}",
        target=f"expert:{expert.id}",
        reason=reason,
        detail={"version": expert.latest_version, "status": expert.status, **detail},
    )
    return became_active


def _flag(session: Session, row: ArrivalCheck, *, error: str | None) -> None:
    """The version did not pass (or could not be measured): report it to moderators."""
    row.status = FLAGGED if error is None else FAILED
    row.error = error
    row.decided_at = row.decided_at or utcnow()
    session.flush()
    if error is None:
        reason = (
            f"arrival check of version {row.version}: it does not help its own samples "
            f"enough ({_summary(row)})"
        )
    else:
        reason = f"arrival check of version {row.version} could not run: {error}"
    numbers = {"version": row.version, "job": row.job_id, "error": error, **numbers_of(row)}
    report = reports.flag(session=session, expert_id=row.expert_id, reason=reason, numbers=numbers)
    row.report_id = report.id
    session.flush()


def numbers_of(row: ArrivalCheck) -> dict[str, Any]:
    return {
        "text_set": TEXT_SET,
        "bits_per_byte": row.bits_per_byte,
        "base_bits_per_byte": row.base_bits_per_byte,
        "relative_change": row.relative_change,
        "min_gain": row.min_gain,
    }


def _summary(row: ArrivalCheck) -> str:
    if row.bits_per_byte is None or row.base_bits_per_byte is None:
        return "no measurement"
    change = "n/a" if row.relative_change is None else f"{row.relative_change:+.2%}"
    required = "below the base" if row.min_gain == 0 else f"below {-row.min_gain:+.2%}"
    return (
        f"{row.bits_per_byte:.4f} bits/byte on its samples, base {row.base_bits_per_byte:.4f}, "
        f"change {change}, required {required}"
    )


def latest_check(*, session: Session, expert_id: str) -> ArrivalCheck | None:
    return session.scalars(
        select(ArrivalCheck)
        .where(ArrivalCheck.expert_id == expert_id)
        .order_by(ArrivalCheck.version.desc())
        .limit(1)
    ).one_or_none()


def arrival_view(*, session: Session, expert_id: str) -> dict[str, Any] | None:
    """The expert's latest arrival check, for ``GET /v1/experts/{id}``; None when none
    ran (submitted with the checks off, or made by a composition)."""
    row = latest_check(session=session, expert_id=expert_id)
    if row is None:
        return None
    job = session.get(Job, row.job_id) if row.job_id is not None else None
    state = row.status
    if state == PENDING and job is not None and job.status == governance.CANCELLED:
        # A disable or a withdrawal cancelled the job (docs/governance.md).
        state = governance.CANCELLED
    return {
        "version": row.version,
        "state": state,
        "job_id": row.job_id,
        "job_status": job.status if job is not None else None,
        **numbers_of(row),
        "error": row.error,
        "report_id": row.report_id,
        "created_at": row.created_at.isoformat(),
        "decided_at": row.decided_at.isoformat() if row.decided_at else None,
    }
