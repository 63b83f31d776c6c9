"""What a disable or a withdrawal reaches (docs/governance.md, "States").

An expert made from others (average, distill: ``expert_parents``) is withdrawn with them:
``propagate`` walks the descendants of a changed expert, transitively, and gives each the
state its ancestors call for, in the caller's transaction:

- an ancestor ``disabled`` or ``withdrawn`` withdraws it: ``withdrawn_by_lineage``, with
  that ancestor as its ``withdrawn_cause`` and its status before kept in
  ``lineage_prior_status``;
- once no ancestor is disabled or withdrawn, it returns to that status; so a re-enable
  restores exactly what was withdrawn only because of it.

A descendant in a state of its own (disabled, withdrawn, rejected) keeps it. Every
expert that stops being servable has its queued and leased jobs cancelled
(``cancel_jobs_using``): a cancelled job's heartbeat, failure and completion answer 409
``job_cancelled`` and store nothing.

The functions take the caller's session and never commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, object_session

from registry.db.models import (
    Composition,
    CompositionExpert,
    Expert,
    ExpertParent,
    ExpertVersion,
    Job,
    utcnow,
)
from registry.errors import UnavailableForLegalReasons
from registry.retrieval import store as retrieval_store

ACTIVE = "active"
DISABLED = "disabled"
WITHDRAWN = "withdrawn"
WITHDRAWN_BY_LINEAGE = "withdrawn_by_lineage"
# An ancestor in one of these states withdraws its descendants.
WITHDRAWING = (DISABLED, WITHDRAWN)
# States an expert holds on its own account: lineage never overrides them.
OWN_STATES = (DISABLED, WITHDRAWN, "rejected")
CANCELLED = "cancelled"


def children(session: Session, expert_id: str) -> list[str]:
    return sorted(
        set(
            session.scalars(
                select(ExpertParent.expert_id).where(ExpertParent.parent_id == expert_id)
            )
        )
    )


def parents(session: Session, expert_id: str) -> list[str]:
    return sorted(
        set(
            session.scalars(
                select(ExpertParent.parent_id).where(ExpertParent.expert_id == expert_id)
            )
        )
    )


def descendants(session: Session, expert_id: str) -> list[str]:
    """Every expert derived from ``expert_id``, transitively, nearest first."""
    seen: dict[str, None] = {}
    frontier = [expert_id]
    while frontier:
        rows = session.scalars(
            select(ExpertParent.expert_id).where(ExpertParent.parent_id.in_(frontier))
        )
        frontier = sorted({r for r in rows if r not in seen and r != expert_id})
        for r in frontier:
            seen[r] = None
    return list(seen)


def withdrawing_ancestor(session: Session, expert_id: str) -> Expert | None:
    """The nearest ancestor (ties by id) that is disabled or withdrawn, or None."""
    seen = {expert_id}
    frontier = [expert_id]
    while frontier:
        ids = sorted(
            {
                p
                for p in session.scalars(
                    select(ExpertParent.parent_id).where(ExpertParent.expert_id.in_(frontier))
                )
                if p not in seen
            }
        )
        if not ids:
            return None
        rows = {e.id: e for e in session.scalars(select(Expert).where(Expert.id.in_(ids)))}
        for i in ids:
            if rows[i].status in WITHDRAWING:
                return rows[i]
        seen.update(ids)
        frontier = ids
    return None


@dataclass
class Change:
    expert_id: str
    status: str
    previous: str
    cause: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "expert_id": self.expert_id,
            "status": self.status,
            "previous_status": self.previous,
            "cause": self.cause,
        }


def settle(session: Session, expert: Expert) -> Change | None:
    """Give ``expert`` the state its ancestors call for (see the module docstring)."""
    if expert.status in OWN_STATES:
        return None
    if expert.status == WITHDRAWN_BY_LINEAGE and expert.withdrawn_cause is not None:
        # The cause recorded stays while it still withdraws (an ancestor's state only
        # changes through this module, which settles every descendant).
        current = session.get(Expert, expert.withdrawn_cause)
        if current is not None and current.status in WITHDRAWING:
            return None
    cause = withdrawing_ancestor(session, expert.id)
    previous = expert.status
    if cause is not None:
        if expert.status == WITHDRAWN_BY_LINEAGE and expert.withdrawn_cause == cause.id:
            return None
        if expert.status != WITHDRAWN_BY_LINEAGE:
            expert.lineage_prior_status = expert.status
        expert.status = WITHDRAWN_BY_LINEAGE
        expert.withdrawn_cause = cause.id
    elif expert.status == WITHDRAWN_BY_LINEAGE:
        expert.status = expert.lineage_prior_status or ACTIVE
        expert.withdrawn_cause = None
        expert.lineage_prior_status = None
    else:
        return None
    expert.updated_at = utcnow()
    retrieval_store.bump(session=session, expert_id=expert.id)
    return Change(expert.id, expert.status, previous, expert.withdrawn_cause)


def propagate(session: Session, expert_id: str) -> list[Change]:
    """Settle every descendant of ``expert_id``, nearest first; cancel the jobs of those
    withdrawn. Returns what changed."""
    changes: list[Change] = []
    for d in descendants(session, expert_id):
        row = session.scalars(select(Expert).where(Expert.id == d).with_for_update()).one()
        change = settle(session, row)
        if change is not None:
            changes.append(change)
    withdrawn = [c.expert_id for c in changes if c.status == WITHDRAWN_BY_LINEAGE]
    if withdrawn:
        cancel_jobs_using(session, withdrawn, reason=f"an ancestor ({expert_id}) was withdrawn")
    return changes


def cancel_jobs_using(session: Session, expert_ids: list[str], *, reason: str) -> list[str]:
    """Cancel the queued and leased jobs that consume any of ``expert_ids``: a
    composition's (through ``composition_experts``), and any whose payload names one (a
    composition's check, an evaluation of the expert or of a composition using it). Their
    compositions fail. Returns the cancelled jobs' ids."""
    now = utcnow()
    wanted = set(expert_ids)
    job_ids = set(
        session.scalars(
            select(Job.id)
            .join(Composition, Composition.job_id == Job.id)
            .join(CompositionExpert, CompositionExpert.composition_id == Composition.id)
            .where(
                CompositionExpert.expert_id.in_(expert_ids),
                Job.status.in_(("queued", "leased")),
            )
        )
    )
    # The jobs not yet finished are few: their payloads are read here.
    for job_id, payload in session.execute(
        select(Job.id, Job.payload).where(Job.status.in_(("queued", "leased")))
    ):
        # A forgetting measurement uses a disabled expert on purpose: it runs on
        # (docs/governance.md, "Proof of forgetting").
        forgetting = isinstance(payload, dict) and payload.get("purpose") == "forgetting"
        if _named_experts(payload) & wanted and not forgetting:
            job_ids.add(job_id)
    cancelled = sorted(job_ids)
    if not cancelled:
        return []
    session.execute(
        update(Job)
        .where(Job.id.in_(cancelled))
        .values(
            status=CANCELLED,
            error=f"cancelled: {reason}",
            lease_owner=None,
            lease_expires_at=None,
            updated_at=now,
            finished_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(Composition)
        .where(Composition.job_id.in_(cancelled), Composition.status.in_(("pending", "verifying")))
        .values(status="failed", updated_at=now)
        .execution_options(synchronize_session=False)
    )
    session.expire_all()
    return cancelled


def _named_experts(payload: Any) -> set[str]:
    """The expert ids a job's payload names (registry/protocol/jobs.py): a composition's
    experts, an evaluation's subject expert, or its subject composition's experts and
    output."""
    if not isinstance(payload, dict):
        return set()
    refs: list[Any] = list(payload.get("experts") or [])
    subject = payload.get("subject")
    if isinstance(subject, dict):
        refs.append(subject.get("expert"))
        manifest = subject.get("manifest")
        if isinstance(manifest, dict):
            refs.extend(manifest.get("experts") or [])
            refs.append(manifest.get("output"))
    return {r["id"] for r in refs if isinstance(r, dict) and isinstance(r.get("id"), str)}


def withdrawal_text(expert: Expert) -> str:
    """Why an expert is not served, naming the cause."""
    if expert.status == WITHDRAWN_BY_LINEAGE:
        session = object_session(expert)
        cause = (
            session.get(Expert, expert.withdrawn_cause)
            if session and expert.withdrawn_cause
            else None
        )
        state = cause.status if cause is not None else "withdrawn"
        return (
            f"expert {expert.id} is withdrawn_by_lineage: its ancestor "
            f"{expert.withdrawn_cause} is {state}"
        )
    if expert.status == WITHDRAWN:
        return f"expert {expert.id} is withdrawn by its owner"
    return f"expert {expert.id} is {expert.status}"


class Withdrawn(UnavailableForLegalReasons):
    """451 whose problem carries ``cause``: the expert that withdrew it and its state."""

    def __init__(self, detail: str, *, code: str, cause: dict[str, Any]) -> None:
        super().__init__(detail, code=code)
        self.cause = cause

    def problem(self, instance: str | None = None) -> dict[str, Any]:
        return {**super().problem(instance), "cause": self.cause}


def unavailable(expert: Expert, *, what: str) -> Withdrawn:
    """The 451 for a withdrawn expert: the problem names the expert that caused it."""
    cause_id = expert.withdrawn_cause if expert.status == WITHDRAWN_BY_LINEAGE else expert.id
    return Withdrawn(
        f"{withdrawal_text(expert)}; {what}",
        code="expert_disabled",
        cause={"expert_id": cause_id, "status": _status_of(expert, cause_id)},
    )


def _status_of(expert: Expert, expert_id: str | None) -> str:
    if expert_id == expert.id or expert_id is None:
        return expert.status
    session = object_session(expert)
    other = session.get(Expert, expert_id) if session is not None else None
    return other.status if other is not None else "withdrawn"


def disabled_holder(session: Session, digest: str) -> Expert | None:
    """A disabled expert that has a version with these weights, or None."""
    return session.scalars(
        select(Expert)
        .join(ExpertVersion, ExpertVersion.expert_id == Expert.id)
        .where(ExpertVersion.digest == digest, Expert.status == DISABLED)
        .order_by(Expert.id)
        .limit(1)
    ).one_or_none()


def lineage_view(session: Session, expert: Expert) -> dict[str, Any]:
    def node(e: Expert) -> dict[str, Any]:
        return {
            "id": e.id,
            "name": e.name,
            "status": e.status,
            "withdrawn_cause": e.withdrawn_cause,
        }

    def load(ids: list[str]) -> list[dict[str, Any]]:
        if not ids:
            return []
        rows = session.scalars(select(Expert).where(Expert.id.in_(ids)).order_by(Expert.id))
        return [node(e) for e in rows]

    return {
        **node(expert),
        "parents": load(parents(session, expert.id)),
        "children": load(children(session, expert.id)),
    }
