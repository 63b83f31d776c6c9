"""Worker accountability: refused results are counted, and a worker token refused too
often in a row is suspended, audited, and kept off the job queue until an admin lifts it.

A *refusal* is the registry rejecting something a worker token claimed on a job: a
completion whose output or result fails validation, an action on a job leased by another
token (``not_lease_holder``), or a verification that contradicts the worker's output. An
accepted completion resets the count. At ``threshold`` consecutive refusals (the
``worker_suspend_after_refusals`` setting) the token is suspended: every worker route
answers it 403 ``token_suspended``, the jobs it holds go back to the queue, and an
entry of the audit log (registry/services/audit.py) records who, why and the refusals.
Only ``worker`` tokens are counted: an admin acting on the queue is the operator.

``record_refusal``, ``reset_refusals``, ``suspend`` and ``lift_suspension`` take the
caller's session and never commit; ``record_refusal_now`` owns its transaction, for a
refusal that must outlive the request's failing one (the request answers 4xx and its own
transaction rolls back).
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from registry.db.models import AuditEvent, Job, Token, utcnow
from registry.errors import Conflict, Forbidden, NotFound
from registry.services import audit as audit_log

log = logging.getLogger("agora.registry")

MAX_REASON_CHARS = 2000
SUSPEND_ACTION = "token.suspend"
LIFT_ACTION = "token.lift_suspension"


class TokenSuspended(Forbidden):
    def __init__(self) -> None:
        super().__init__(
            "this worker token is suspended after repeated refused results; an admin can "
            "lift the suspension (`agora admin lift-suspension`)",
            code="token_suspended",
        )


def audit(
    *,
    session: Session,
    actor: str,
    action: str,
    subject: str,
    detail: dict[str, Any],
    reason: str = "",
) -> AuditEvent:
    """Append one entry to the audit log, on ``subject`` (its target): the chain's one
    way in, registry/services/audit.py."""
    return audit_log.append(
        session, actor=actor, action=action, target=subject, reason=reason, detail=detail
    )


def _subject(token_id: int) -> str:
    return f"token:{token_id}"


def record_refusal(*, session: Session, token_id: int, reason: str, threshold: int) -> bool:
    """Count one refused result of the worker token ``token_id``; suspend it when the count
    of consecutive refusals reaches ``threshold``. True when this call suspended it.
    The caller commits (or calls ``record_refusal_now``)."""
    reason = reason[:MAX_REASON_CHARS]
    count = session.scalars(
        update(Token)
        .where(Token.id == token_id, Token.role == "worker")
        .values(refusals=Token.refusals + 1)
        .returning(Token.refusals)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    if count is None or count < threshold:
        return False
    return suspend(
        session=session,
        token_id=token_id,
        reason=f"{count} consecutive refused results; the last: {reason}",
        actor="registry",
        refusals=count,
    )


def record_refusal_now(*, session: Session, token_id: int, reason: str, threshold: int) -> bool:
    """``record_refusal`` in its own transaction, on a session with none open (after the
    request's own transaction rolled back). A database failure here is logged, never
    raised: the caller is about to raise the refusal itself."""
    try:
        with session.begin():
            return record_refusal(
                session=session, token_id=token_id, reason=reason, threshold=threshold
            )
    except SQLAlchemyError:
        log.warning("could not record a refusal of token #%s", token_id, exc_info=True)
        return False


def reset_refusals(*, session: Session, token_id: int) -> None:
    """An accepted result: the count of consecutive refusals starts again."""
    session.execute(
        update(Token)
        .where(Token.id == token_id, Token.refusals != 0)
        .values(refusals=0)
        .execution_options(synchronize_session=False)
    )


def suspend(
    *, session: Session, token_id: int, reason: str, actor: str, refusals: int | None = None
) -> bool:
    """Suspend a token (once: False if it already was), requeue the jobs it holds, and
    audit it. The caller commits."""
    now = utcnow()
    done = session.scalars(
        update(Token)
        .where(Token.id == token_id, Token.suspended_at.is_(None))
        .values(suspended_at=now, suspension_reason=reason[:MAX_REASON_CHARS])
        .returning(Token.id)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    if done is None:
        return False
    # Its leases end now: the jobs are queued again for other workers, and this lease is
    # not counted as one of the job's attempts (the worker was at fault, not the job).
    requeued = list(
        session.scalars(
            update(Job)
            .where(Job.lease_token_id == token_id, Job.status == "leased")
            .values(
                status="queued",
                attempts=Job.attempts - 1,
                lease_owner=None,
                lease_token_id=None,
                lease_expires_at=None,
                progress=None,
                run_after=now,
                updated_at=now,
            )
            .returning(Job.id)
            .execution_options(synchronize_session=False)
        )
    )
    audit(
        session=session,
        actor=actor,
        action=SUSPEND_ACTION,
        subject=_subject(token_id),
        detail={"reason": reason, "refusals": refusals, "requeued_jobs": sorted(requeued)},
        reason=reason[:MAX_REASON_CHARS],
    )
    return True


def lift_suspension(*, session: Session, token_id: int, actor: str, note: str = "") -> Token:
    """Lift a token's suspension (its refusal count starts again at 0), audited."""
    token = session.get(Token, token_id, with_for_update=True, populate_existing=True)
    if token is None:
        raise NotFound(f"no token #{token_id}", code="token_not_found")
    if token.suspended_at is None:
        raise Conflict(f"token #{token_id} is not suspended", code="not_suspended")
    previous = {
        "suspended_at": token.suspended_at.isoformat(),
        "reason": token.suspension_reason,
        "refusals": token.refusals,
    }
    token.suspended_at = None
    token.suspension_reason = None
    token.refusals = 0
    session.flush()
    audit(
        session=session,
        actor=actor,
        action=LIFT_ACTION,
        subject=_subject(token_id),
        detail={"note": note[:MAX_REASON_CHARS], "lifted": previous},
        reason=note[:MAX_REASON_CHARS],
    )
    return token


def suspended_tokens(*, session: Session) -> list[Token]:
    return list(
        session.scalars(select(Token).where(Token.suspended_at.is_not(None)).order_by(Token.id))
    )


def audit_events(*, session: Session, subject: str | None = None) -> list[AuditEvent]:
    stmt = select(AuditEvent).order_by(AuditEvent.seq)
    if subject is not None:
        stmt = stmt.where(AuditEvent.target == subject)
    return list(session.scalars(stmt))
