"""Moderation: disable and re-enable an expert, each with a reason, each recorded.

A disabled expert is withdrawn at once: its datasheet and weights answer 451 and it leaves
the search index in the same request (``moderate`` syncs the index after the commit).
Every action is a row of ``moderation_actions`` and an entry of the hash-chained audit
log (registry/services/audit.py: ``expert.disable`` / ``expert.enable``, with the reason).

``moderate`` is the write sequence of the disable / enable routes and owns its transaction
(registry/api/deps.py); the other functions take the caller's session and never commit.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.db.models import Expert, ModerationAction, utcnow
from registry.errors import BadRequest, Conflict
from registry.retrieval import store as retrieval_store
from registry.retrieval.service import Retrieval
from registry.services import audit
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
    now = utcnow()
    previous = expert.status
    expert.status = target
    expert.updated_at = now
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
            "status": target,
            "previous_status": previous,
            "moderation_action": row.id,
            "actor_token": principal.token_id,
        },
    )
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
        expert, row = set_status(
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
