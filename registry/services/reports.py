"""Reports: anyone with a token reports an expert (a reason, optional evidence text);
moderators list the open ones and resolve each, dismissing it or disabling the expert with
the report attached; the reporter reads the outcome (docs/governance.md, "Reports").

Every report and resolution is an audit log entry (``expert.report``,
``report.resolve``). The functions take the caller's session and never commit.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.db.models import ExpertReport, utcnow
from registry.errors import BadRequest, Conflict, Forbidden, NotFound
from registry.services import audit, moderation
from registry.services.experts import get_expert
from registry.services.tokens import Principal

MAX_REASON_CHARS = moderation.MAX_REASON_CHARS
MAX_EVIDENCE_CHARS = 20_000
OPEN = "open"
# resolution -> the report's status after it
RESOLUTIONS = {"dismiss": "dismissed", "disable": "disabled"}
STATUSES = (OPEN, *RESOLUTIONS.values())
MAX_PAGE = 100
# The reporter of the registry's own flags (arrival checks, monitoring).
REGISTRY = "registry"


def _text(value: str | None, *, field: str, limit: int, required: bool) -> str:
    text = (value or "").strip()
    if required and not text:
        raise BadRequest(f"a non-empty {field} is required", code=f"missing_{field}")
    if len(text) > limit:
        raise BadRequest(f"the {field} is at most {limit} characters", code=f"{field}_too_long")
    return text


def file_report(
    *,
    session: Session,
    principal: Principal,
    expert_id: str,
    reason: str | None,
    evidence: str | None,
) -> ExpertReport:
    reason_text = _text(reason, field="reason", limit=MAX_REASON_CHARS, required=True)
    evidence_text = _text(evidence, field="evidence", limit=MAX_EVIDENCE_CHARS, required=False)
    expert = get_expert(session=session, expert_id=expert_id)
    report = ExpertReport(
        expert_id=expert.id,
        reporter=principal.name,
        reporter_token_id=principal.token_id,
        reason=reason_text,
        evidence=evidence_text,
        status=OPEN,
        created_at=utcnow(),
    )
    session.add(report)
    session.flush()
    audit.append(
        session,
        actor=principal.name,
        action="expert.report",
        target=f"expert:{expert.id}",
        reason=reason_text,
        detail={
            "report": report.id,
            "evidence_chars": len(evidence_text),
            "actor_token": principal.token_id,
        },
    )
    return report


def flag(*, session: Session, expert_id: str, reason: str, numbers: dict[str, Any]) -> ExpertReport:
    """The registry's own report of an expert, into the moderators' queue: a check on
    arrival or a monitoring run found a problem. ``numbers`` (the measurements behind it)
    are kept as the evidence, as JSON."""
    evidence = json.dumps(numbers, sort_keys=True, allow_nan=False)
    report = ExpertReport(
        expert_id=expert_id,
        reporter=REGISTRY,
        reporter_token_id=None,
        reason=reason[:MAX_REASON_CHARS],
        evidence=evidence[:MAX_EVIDENCE_CHARS],
        status=OPEN,
        created_at=utcnow(),
    )
    session.add(report)
    session.flush()
    audit.append(
        session,
        actor=REGISTRY,
        action="expert.flag",
        target=f"expert:{expert_id}",
        reason=report.reason,
        detail={"report": report.id, "numbers": numbers},
    )
    return report


def get_report(*, session: Session, report_id: int, for_update: bool = False) -> ExpertReport:
    stmt = select(ExpertReport).where(ExpertReport.id == report_id)
    if for_update:
        stmt = stmt.with_for_update()
    report = session.scalars(stmt).one_or_none()
    if report is None:
        raise NotFound(f"no report {report_id}", code="report_not_found")
    return report


def check_reader(report: ExpertReport, principal: Principal) -> None:
    """Its reporter (the same identity) and moderators and admins read a report."""
    if principal.role in ("moderator", "admin") or principal.name == report.reporter:
        return
    raise Forbidden(f"report {report.id} is not yours", code="not_reporter")


def list_reports(
    *, session: Session, principal: Principal, status: str | None, limit: int
) -> list[ExpertReport]:
    """Moderators and admins: the queue (``status``, default open), oldest first. Anyone
    else: their own reports, newest first."""
    if status is not None and status not in STATUSES:
        raise BadRequest(f"status must be one of {', '.join(STATUSES)}", code="invalid_status")
    if principal.role in ("moderator", "admin"):
        stmt = select(ExpertReport).where(ExpertReport.status == (status or OPEN))
        stmt = stmt.order_by(ExpertReport.id)
    else:
        stmt = select(ExpertReport).where(ExpertReport.reporter == principal.name)
        if status is not None:
            stmt = stmt.where(ExpertReport.status == status)
        stmt = stmt.order_by(ExpertReport.id.desc())
    return list(session.scalars(stmt.limit(limit)))


def resolve(
    *,
    session: Session,
    principal: Principal,
    report_id: int,
    resolution: str,
    note: str | None,
) -> ExpertReport:
    """Dismiss the report, or disable its expert with the report attached (the disable's
    reason is the note, else the report's reason). 409 ``report_resolved`` when done."""
    if resolution not in RESOLUTIONS:
        raise BadRequest(
            f"resolution must be one of {', '.join(RESOLUTIONS)}", code="invalid_resolution"
        )
    note_text = _text(note, field="note", limit=MAX_REASON_CHARS, required=False)
    report = get_report(session=session, report_id=report_id, for_update=True)
    if report.status != OPEN:
        raise Conflict(f"report {report.id} is already {report.status}", code="report_resolved")
    action_id = None
    if resolution == "disable":
        reason = f"report {report.id}: {note_text or report.reason}"
        _, row = moderation.set_status(
            session=session,
            expert_id=report.expert_id,
            action="disable",
            reason=reason[:MAX_REASON_CHARS],
            principal=principal,
        )
        action_id = row.id
    else:
        # A flag of an arrival check, dismissed, releases its version
        # (registry/services/arrival.py, which imports this module).
        from registry.services import arrival

        arrival.on_dismiss(
            session=session,
            report_id=report.id,
            actor=principal.name,
            actor_token=principal.token_id,
        )
    report.status = RESOLUTIONS[resolution]
    report.resolution = note_text
    report.resolved_by = principal.name
    report.resolved_at = utcnow()
    report.moderation_action = action_id
    session.flush()
    audit.append(
        session,
        actor=principal.name,
        action="report.resolve",
        target=f"expert:{report.expert_id}",
        reason=note_text,
        detail={
            "report": report.id,
            "resolution": resolution,
            "moderation_action": action_id,
            "actor_token": principal.token_id,
        },
    )
    return report


def report_view(report: ExpertReport) -> dict[str, Any]:
    return {
        "id": report.id,
        "expert_id": report.expert_id,
        "reporter": report.reporter,
        "reason": report.reason,
        "evidence": report.evidence,
        "status": report.status,
        "resolution": report.resolution,
        "resolved_by": report.resolved_by,
        "resolved_at": report.resolved_at.isoformat() if report.resolved_at else None,
        "moderation_action": report.moderation_action,
        "created_at": report.created_at.isoformat(),
    }
