"""Moderation: disable and re-enable an expert, each with a reason, each recorded; an
owner's withdrawal and restoration of its own expert, recorded the same way. Each reaches
the expert's descendants in the same transaction (registry/services/governance.py).

A disabled expert is withdrawn at once: its datasheet and weights answer 451 and it leaves
the search index in the same request (``moderate`` syncs the index after the commit).
Every action is a row of ``moderation_actions`` and an entry of the hash-chained audit
log (registry/services/audit.py: ``expert.disable`` / ``expert.enable`` /
``expert.withdraw`` / ``expert.restore``, with the reason).

``moderate`` is the write sequence of the disable / enable routes and owns its transaction
(registry/api/deps.py); the other functions take the caller's session and never commit.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.db.models import Expert, ModerationAction, utcnow
from registry.errors import BadRequest, Conflict, Forbidden
from registry.retrieval import store as retrieval_store
from registry.retrieval.service import Retrieval
from registry.services import audit, forgetting, governance
from registry.services.experts import get_expert
from registry.services.idempotency import IdempotentRequest, StoredResponse, reserves_key
from registry.services.tokens import Principal

# action -> the status it leaves the expert in
ACTIONS = {"disable": "disabled", "enable": "active"}
MAX_REASON_CHARS = 2000


def check_reason(reason: str | None) -> str:
    text = (reason or "").strip()
    if not text:
        raise BadRequest("a non-empty reason is required", code="missing_reason")
    if len(text) > MAX_REASON_CHARS:
        raise BadRequest(
            f"the reason is at most {MAX_REASON_CHARS} characters", code="reason_too_long"
        )
    return text


def set_status(
    *, session: Session, expert_id: str, action: str, reason: str | None, principal: Principal
) -> tuple[Expert, ModerationAction]:
    """Apply ``action`` ("disable" or "enable") with its reason; the caller commits."""
    text = check_reason(reason)
    target = ACTIONS[action]
    expert = get_expert(session=session, expert_id=expert_id, for_update=True)
    if expert.status == target:
        raise Conflict(f"expert {expert.id} is already {target}", code="status_unchanged")
    if action == "enable" and expert.status != governance.DISABLED:
        raise Conflict(
            f"expert {expert.id} is {expert.status}, not disabled: there is nothing to enable",
            code="status_unchanged",
        )
    now = utcnow()
    previous = expert.status
    expert.status = target
    expert.updated_at = now
    expert.withdrawn_cause = None
    expert.lineage_prior_status = None
    # Re-enabled under a still withdrawn ancestor: withdrawn by lineage, not active.
    governance.settle(session, expert)
    cancelled = (
        governance.cancel_jobs_using(session, [expert.id], reason=f"expert {expert.id} disabled")
        if action == "disable"
        else []
    )
    row = _record(session, expert, principal, action, text, previous, cancelled, now)
    if action == "disable":
        # The proof of forgetting's measurements (docs/governance.md).
        forgetting.enqueue(
            session=session, expert=expert, moderation_action=row.id, created_by=principal.name
        )
    return expert, row


# An owner's actions on its own expert (or an admin's): action -> the status it leaves.
OWNER_ACTIONS = {"withdraw": governance.WITHDRAWN, "restore": "active"}
WITHDRAWABLE = ("active", "quarantined", governance.WITHDRAWN_BY_LINEAGE)


def owner_action(
    *, session: Session, expert_id: str, action: str, reason: str | None, principal: Principal
) -> tuple[Expert, ModerationAction]:
    """``withdraw`` or ``restore`` an expert by its owner (or an admin), reason optional;
    it reaches the expert's descendants as a disable does. The caller commits."""
    text = (reason or "").strip()
    if len(text) > MAX_REASON_CHARS:
        raise BadRequest(
            f"the reason is at most {MAX_REASON_CHARS} characters", code="reason_too_long"
        )
    expert = get_expert(session=session, expert_id=expert_id, for_update=True)
    if expert.owner != principal.name and not principal.is_admin:
        raise Forbidden(
            f"expert {expert.id} belongs to {expert.owner!r}; only its owner withdraws or "
            "restores it",
            code="not_owner",
        )
    previous = expert.status
    if action == "withdraw":
        if expert.status not in WITHDRAWABLE:
            raise Conflict(
                f"expert {expert.id} is {expert.status}; only an active, quarantined or "
                "withdrawn_by_lineage expert can be withdrawn",
                code="status_unchanged",
            )
        # The status a restore returns to (a quarantined expert stays awaiting its check).
        own = (
            expert.lineage_prior_status
            if expert.status == governance.WITHDRAWN_BY_LINEAGE
            else expert.status
        )
        expert.status = governance.WITHDRAWN
        expert.lineage_prior_status = own or "active"
        expert.withdrawn_cause = None
        cancelled = governance.cancel_jobs_using(
            session, [expert.id], reason=f"expert {expert.id} withdrawn by its owner"
        )
    else:
        if expert.status != governance.WITHDRAWN:
            raise Conflict(
                f"expert {expert.id} is {expert.status}, not withdrawn: nothing to restore",
                code="status_unchanged",
            )
        expert.status = expert.lineage_prior_status or "active"
        expert.lineage_prior_status = None
        governance.settle(session, expert)
        cancelled = []
        # Back awaiting its check on arrival, which the withdrawal cancelled: queued again
        # (registry/services/arrival.py; imported here: it imports reports, which imports
        # this module).
        from registry.services import arrival

        arrival.resume(session=session, expert=expert)
    now = utcnow()
    expert.updated_at = now
    row = _record(session, expert, principal, action, text, previous, cancelled, now)
    return expert, row


@reserves_key
def moderate(
    *,
    session: Session,
    retrieval: Retrieval,
    principal: Principal,
    expert_id: str,
    action: str,
    reason: str | None,
    idem: IdempotentRequest,
) -> StoredResponse:
    """Apply ``action`` in one transaction (with the Idempotency-Key's outcome), then sync
    this replica's search index so the expert leaves (or rejoins) it before the answer."""

    def write(s: Session) -> StoredResponse:
        apply = owner_action if action in OWNER_ACTIONS else set_status
        expert, row = apply(
            session=s, expert_id=expert_id, action=action, reason=reason, principal=principal
        )
        return StoredResponse(200, {**action_view(row), "status": expert.status})

    response = idem.commit_or_replay(session, write)
    retrieval.sync()
    return response


def list_actions(*, session: Session, expert_id: str) -> list[ModerationAction]:
    return list(
        session.scalars(
            select(ModerationAction)
            .where(ModerationAction.expert_id == expert_id)
            .order_by(ModerationAction.id)
        )
    )


def action_view(row: ModerationAction) -> dict[str, Any]:
    return {
        "id": row.id,
        "expert_id": row.expert_id,
        "action": row.action,
        "reason": row.reason,
        "actor": row.actor,
        "at": row.at.isoformat(),
    }


def _record(  # noqa: PLR0917 (what one recorded action consists of)
    session: Session,
    expert: Expert,
    principal: Principal,
    action: str,
    text: str,
    previous: str,
    cancelled: list[Any],
    now: dt.datetime,
) -> ModerationAction:
    """The lineage follows the expert's new status; the action is recorded, the search
    index told, and the audit log appended, all in the caller's transaction."""
    lineage = governance.propagate(session, expert.id)
    row = ModerationAction(
        expert_id=expert.id, action=action, reason=text, actor=principal.name, at=now
    )
    session.add(row)
    session.flush()
    retrieval_store.bump(session=session, expert_id=expert.id)
    audit.append(
        session,
        actor=principal.name,
        action=f"expert.{action}",
        target=f"expert:{expert.id}",
        reason=text,
        detail={
            "status": expert.status,
            "previous_status": previous,
            "moderation_action": row.id,
            "actor_token": principal.token_id,
            "lineage": [c.as_dict() for c in lineage],
            "cancelled_jobs": cancelled,
        },
    )
    return row
