"""What the moderation page shows, across experts, and the two writes its forms make
(docs/web.md, "Moderation").

``overview`` reads, in the caller's transaction: the open report queue, the experts that
are not active (with the latest action's reason), the experts the registry itself flagged
(checks on arrival and monitoring runs, with their numbers), the newest proofs of
forgetting, a page of the audit log and the verification of its chain.

``moderate_expert`` and ``resolve_report`` are the forms' write sequences, the same as
the API's (registry/api/moderation.py, registry/api/reports.py): each owns its transaction
and syncs this replica's search index after the commit, so a disabled expert has left
search before the page answers. A form carries no Idempotency-Key (the browser's
Post/Redirect/Get keeps a reload from posting twice, and a second disable is a 409).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from registry.db.models import (
    ArrivalCheck,
    Expert,
    ExpertReport,
    ForgettingReport,
    Job,
    ModerationAction,
    MonitorRun,
)
from registry.errors import BadRequest
from registry.retrieval.service import Retrieval
from registry.services import arrival, audit, forgetting, moderation, reports
from registry.services.audit import VerifyReport
from registry.services.experts import ACTIVE, QUARANTINED
from registry.services.governance import WITHDRAWN_BY_LINEAGE
from registry.services.idempotency import IdempotentRequest, StoredResponse
from registry.services.tokens import Principal

# Rows per section: the newest (the queue: the oldest) this many.
MAX_ROWS = 100
FORGETTING_ROWS = 20

# A number on the page and how to read it: bits per byte, a signed relative change, or a
# share (a fraction shown as a percentage).
BPB, CHANGE, SHARE = "bpb", "change", "share"


@dataclass(frozen=True)
class Number:
    label: str
    value: float | None
    kind: str


@dataclass(frozen=True)
class Overview:
    reports: list[dict[str, Any]]
    open_reports: int
    withdrawn: list[dict[str, Any]]
    flagged: list[dict[str, Any]]
    forgetting: list[dict[str, Any]]
    audit: list[dict[str, Any]]
    audit_older: str | None
    verify: VerifyReport


def overview(*, session: Session, principal: Principal, audit_cursor: str | None) -> Overview:
    """Everything the moderation page shows (moderators and admins; the caller checks)."""
    entries, older = audit.list_entries(session=session, cursor=audit_cursor)
    open_count = session.scalar(
        select(func.count()).select_from(ExpertReport).where(ExpertReport.status == reports.OPEN)
    )
    return Overview(
        reports=report_queue(session=session, principal=principal),
        open_reports=int(open_count or 0),
        withdrawn=not_active(session=session),
        flagged=flagged(session=session),
        forgetting=recent_forgetting(session=session),
        audit=[audit.entry_view(e) for e in entries],
        audit_older=older,
        verify=audit.verify(session=session),
    )


def _experts(session: Session, ids: Iterable[str]) -> dict[str, Expert]:
    wanted = set(ids)
    if not wanted:
        return {}
    return {e.id: e for e in session.scalars(select(Expert).where(Expert.id.in_(wanted)))}


def _with_expert(view: dict[str, Any], expert: Expert | None) -> dict[str, Any]:
    return {
        **view,
        "expert_name": expert.name if expert is not None else None,
        "expert_status": expert.status if expert is not None else None,
    }


def report_queue(*, session: Session, principal: Principal) -> list[dict[str, Any]]:
    """The open reports, oldest first, each with its expert's name and status."""
    rows = reports.list_reports(
        session=session, principal=principal, status=None, limit=reports.MAX_PAGE
    )
    experts = _experts(session, (r.expert_id for r in rows))
    return [_with_expert(reports.report_view(r), experts.get(r.expert_id)) for r in rows]


def _latest_actions(session: Session, ids: list[str]) -> dict[str, ModerationAction]:
    latest: dict[str, ModerationAction] = {}
    if not ids:
        return latest
    stmt = (
        select(ModerationAction)
        .where(ModerationAction.expert_id.in_(ids))
        .order_by(ModerationAction.id.desc())
    )
    for row in session.scalars(stmt):
        latest.setdefault(row.expert_id, row)
    return latest


def _why(session: Session, expert: Expert, action: ModerationAction | None) -> str:
    if expert.status == WITHDRAWN_BY_LINEAGE and expert.withdrawn_cause:
        return f"withdrawn with its ancestor {expert.withdrawn_cause}"
    if action is not None and action.action in (*moderation.ACTIONS, *moderation.OWNER_ACTIONS):
        return action.reason or f"{action.action} (no reason given)"
    if expert.status == QUARANTINED:
        check = arrival.latest_check(session=session, expert_id=expert.id)
        state = check.status if check is not None else "not started"
        return f"check on arrival: {state}"
    return action.reason if action is not None else ""


def not_active(*, session: Session) -> list[dict[str, Any]]:
    """Experts that are not active (quarantined, disabled, withdrawn, by lineage,
    rejected), most recently changed first, with why and by whom."""
    rows = list(
        session.scalars(
            select(Expert)
            .where(Expert.status != ACTIVE)
            .order_by(Expert.updated_at.desc(), Expert.id)
            .limit(MAX_ROWS)
        )
    )
    actions = _latest_actions(session, [e.id for e in rows])
    items = []
    for expert in rows:
        action = actions.get(expert.id)
        items.append(
            {
                "id": expert.id,
                "name": expert.name,
                "owner": expert.owner,
                "status": expert.status,
                "cause": expert.withdrawn_cause,
                "reason": _why(session, expert, action),
                "actor": action.actor if action is not None else None,
                "action": action.action if action is not None else None,
                "at": expert.updated_at.isoformat(),
            }
        )
    return items


def _arrival_numbers(check: ArrivalCheck) -> list[Number]:
    numbers = arrival.numbers_of(check)
    return [
        Number("bits per byte on its samples", numbers["bits_per_byte"], BPB),
        Number("base bits per byte", numbers["base_bits_per_byte"], BPB),
        Number("change against the base", numbers["relative_change"], CHANGE),
        Number("required gain", numbers["min_gain"], SHARE),
    ]


def _monitor_numbers(run: MonitorRun) -> list[Number]:
    return [
        Number("own-domain bits per byte", run.own_bits_per_byte, BPB),
        Number("reference bits per byte", run.reference_bits_per_byte, BPB),
        Number("worsening", run.worsening, CHANGE),
        Number("repetition", run.repetition, SHARE),
        Number("base repetition", run.base_repetition, SHARE),
    ]


def flagged(*, session: Session) -> list[dict[str, Any]]:
    """The registry's own reports (``reports.flag``), newest first: which check raised
    each (an arrival check of a version, or a monitoring run) and its numbers."""
    rows = list(
        session.scalars(
            select(ExpertReport)
            .where(ExpertReport.reporter == reports.REGISTRY)
            .order_by(ExpertReport.id.desc())
            .limit(MAX_ROWS)
        )
    )
    ids = [r.id for r in rows]
    checks = {
        c.report_id: c
        for c in session.scalars(select(ArrivalCheck).where(ArrivalCheck.report_id.in_(ids)))
    }
    runs = {
        r.report_id: r
        for r in session.scalars(select(MonitorRun).where(MonitorRun.report_id.in_(ids)))
    }
    experts = _experts(session, (r.expert_id for r in rows))
    items = []
    for report in rows:
        check, run = checks.get(report.id), runs.get(report.id)
        if check is not None:
            source, numbers = f"arrival check, version {check.version}", _arrival_numbers(check)
        elif run is not None:
            source, numbers = f"monitoring run {run.job_id}", _monitor_numbers(run)
        else:
            source, numbers = "registry", []
        view = _with_expert(reports.report_view(report), experts.get(report.expert_id))
        items.append({**view, "source": source, "numbers": numbers})
    return items


def recent_forgetting(*, session: Session) -> list[dict[str, Any]]:
    """The newest proofs of forgetting, across experts (``forgetting.report_view``)."""
    rows = session.execute(
        select(ForgettingReport, Job)
        .join(Job, Job.id == ForgettingReport.job_id)
        .order_by(ForgettingReport.id.desc())
        .limit(FORGETTING_ROWS)
    ).all()
    experts = _experts(session, (r.expert_id for r, _ in rows))
    views = [_with_expert(forgetting.report_view(r, j), experts.get(r.expert_id)) for r, j in rows]
    # The other domains' text sets are named by their experts' ids: show their names.
    named = _experts(session, (name for v in views for name in (v.get("others") or {})))
    for view in views:
        view["text_set_names"] = {n: named[n].name for n in view.get("others") or {} if n in named}
    return views


# -- the forms' writes -----------------------------------------------------------------------


def moderate_expert(
    *,
    session: Session,
    retrieval: Retrieval,
    principal: Principal,
    expert_id: str,
    action: str,
    reason: str | None,
) -> dict[str, Any]:
    """Disable or enable an expert with a reason (``moderation.moderate``); the action
    recorded, with the expert's status after it."""
    if action not in moderation.ACTIONS:
        raise BadRequest(
            f"action must be one of {', '.join(moderation.ACTIONS)}", code="invalid_action"
        )
    if not expert_id.strip():
        raise BadRequest("an expert id is required", code="missing_expert_id")
    idem = IdempotentRequest(
        principal=principal,
        key=None,
        method="POST",
        path="/moderation/experts",
        fingerprint="",
    )
    response: StoredResponse = moderation.moderate(
        session=session,
        retrieval=retrieval,
        principal=principal,
        expert_id=expert_id.strip(),
        action=action,
        reason=reason,
        idem=idem,
    )
    return response.body


def resolve_report(
    *,
    session: Session,
    retrieval: Retrieval,
    principal: Principal,
    report_id: int,
    resolution: str,
    note: str | None,
) -> dict[str, Any]:
    """Dismiss a report or disable its expert (``reports.resolve``), in one transaction;
    the report as it is now."""
    with session.begin():
        view = reports.report_view(
            reports.resolve(
                session=session,
                principal=principal,
                report_id=report_id,
                resolution=resolution,
                note=note,
            )
        )
    # A disable leaves this replica's search index before the answer.
    retrieval.sync()
    return view
