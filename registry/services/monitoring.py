"""Monitoring: named, dated text sets and scheduled re-measurement of every active expert
(docs/governance.md, "Monitoring").

* Text sets: a moderator uploads a named, dated set of texts (``news`` of
  ``2026-12-01``); ``(name, date)`` is unique. A run measures the newest set of each name.
* Schedules: a moderator schedules monitoring from a time (``not_before``); the registry
  queues one ``evaluate`` job (``EvaluatePayload.purpose`` ``monitor``) per active expert,
  leased by no worker before that time (``Job.run_after``), each with a ``monitor_runs``
  row. With ``every_hours``, each completed run queues that expert's next one
  ``every_hours`` after the run's own time: a chain through the job queue, no scheduler
  process. A cancelled schedule queues nothing more and cancels its queued jobs; a run that
  fails or dies ends its expert's chain (schedule again).
* A run measures the expert's latest version on its own samples (text set ``samples``,
  as an arrival check does) and on the chosen sets, and generates greedy continuations of
  its samples with it and with the base (``ContinuationRequest``).
* Its result (``on_result``, called by the job's completion): the own-domain change
  ``(bpb - reference) / reference`` against the expert's reference, the first own-domain
  evaluation recorded for it by an arrival check or a monitoring run (the run's own-domain
  texts are that reference version's samples, so both numbers score the same texts); the
  repetition rate of its continuations and of the base's. It is flagged (``reports.flag``,
  with the numbers) when the change exceeds ``monitor_max_worsening``, or when its
  repetition exceeds ``monitor_max_repetition`` *and* the base's: a small base may itself
  repeat, and that is no fault of the expert.

The functions take the caller's session and never commit.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from registry.db.models import (
    Evaluation,
    Expert,
    Job,
    MonitorRun,
    MonitorSchedule,
    TextSet,
    utcnow,
)
from registry.errors import BadRequest, Conflict, NotFound, PayloadTooLarge, ValidationFailed
from registry.protocol import (
    EVALUATE_KIND,
    ContinuationRequest,
    ContinuationScore,
    EvaluatePayload,
    TextSetScore,
    relative_change,
)
from registry.services import audit, evaluations, reports
from registry.services import experts as expert_svc
from registry.services import jobs as jobs_svc
from registry.services.arrival import TEXT_SET as OWN
from registry.services.compositions import ResolvedExpert, samples_of
from registry.services.tokens import Principal
from registry.settings import Settings

PURPOSE = "monitor"
# The creator of the jobs a schedule queues, and the actor of its flags.
ACTOR = "registry"
# Purposes whose own-domain evaluation may serve as an expert's reference.
REFERENCE_PURPOSES = ("arrival", PURPOSE)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
MAX_TEXTS = 10_000
MAX_SETS = 20
MAX_EVERY_HOURS = 24 * 366
# Room a job keeps for the expert's own samples (a datasheet's samples are at most 64 KiB).
OWN_SAMPLES_BYTES = 64 * 1024
MAX_PAGE = 200


# -- text sets ---------------------------------------------------------------------------


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise BadRequest(
            "a text set name is 1 to 100 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit",
            code="invalid_name",
        )
    return name


def check_date(value: str) -> str:
    try:
        parsed = dt.date.fromisoformat(value) if len(value) == 10 else None
    except (TypeError, ValueError):
        parsed = None
    if parsed is None:
        raise BadRequest(f"date {value!r} is not a date YYYY-MM-DD", code="invalid_date")
    return parsed.isoformat()


def set_key(text_set: TextSet) -> str:
    """A dated set's text set name in an evaluation: ``name@date``."""
    return f"{text_set.name}@{text_set.date}"


def upload_text_set(
    *,
    session: Session,
    principal: Principal,
    settings: Settings,
    name: str,
    date: str,
    texts: Sequence[str],
) -> TextSet:
    name, date = check_name(name), check_date(date)
    kept = [t for t in texts if t.strip()]
    if not kept:
        raise BadRequest("texts must hold at least one non-blank text", code="invalid_texts")
    if len(kept) > MAX_TEXTS:
        raise PayloadTooLarge(f"a text set holds at most {MAX_TEXTS} texts", code="too_many_texts")
    size = sum(len(t.encode("utf-8")) for t in kept)
    if size > settings.max_text_set_bytes:
        raise PayloadTooLarge(
            f"the texts hold {size} bytes of UTF-8; a text set is at most "
            f"{settings.max_text_set_bytes}",
            code="text_set_too_large",
        )
    existing = session.scalars(
        select(TextSet).where(TextSet.name == name, TextSet.date == date)
    ).first()
    if existing is not None:
        raise Conflict(
            f"text set {name} of {date} exists (id {existing.id}); use another name or date",
            code="text_set_exists",
        )
    row = TextSet(
        name=name,
        date=date,
        texts=kept,
        n_texts=len(kept),
        bytes=size,
        uploader=principal.name,
        created_at=utcnow(),
    )
    try:
        # A savepoint: an upload of the same (name, date) racing this one (PostgreSQL;
        # SQLite serialises writers) is refused by the unique constraint.
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        raise Conflict(f"text set {name} of {date} exists", code="text_set_exists") from None
    audit.append(
        session,
        actor=principal.name,
        action="text_set.upload",
        target=f"text_set:{row.id}",
        reason="",
        detail={
            "name": name,
            "date": date,
            "texts": len(kept),
            "bytes": size,
            "actor_token": principal.token_id,
        },
    )
    return row


def list_text_sets(*, session: Session, name: str | None, limit: int) -> list[TextSet]:
    """Newest first: by the sets' own dates, then by upload."""
    stmt = select(TextSet).order_by(TextSet.date.desc(), TextSet.id.desc())
    if name is not None:
        stmt = stmt.where(TextSet.name == name)
    return list(session.scalars(stmt.limit(limit)))


def get_text_set(*, session: Session, text_set_id: int) -> TextSet:
    row = session.get(TextSet, text_set_id)
    if row is None:
        raise NotFound(f"no text set {text_set_id}", code="text_set_not_found")
    return row


def delete_text_set(*, session: Session, principal: Principal, text_set_id: int) -> TextSet:
    """Removes the set from future runs; jobs already queued carry their own copy."""
    row = get_text_set(session=session, text_set_id=text_set_id)
    session.delete(row)
    session.flush()
    audit.append(
        session,
        actor=principal.name,
        action="text_set.delete",
        target=f"text_set:{text_set_id}",
        reason="",
        detail={"name": row.name, "date": row.date, "actor_token": principal.token_id},
    )
    return row


def text_set_view(row: TextSet, *, with_texts: bool = False) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": row.id,
        "name": row.name,
        "date": row.date,
        "key": set_key(row),
        "n_texts": row.n_texts,
        "bytes": row.bytes,
        "uploader": row.uploader,
        "created_at": row.created_at.isoformat(),
    }
    if with_texts:
        view["texts"] = list(row.texts)
    return view


def newest_sets(
    *, session: Session, names: Sequence[str] | None, limit: int | None
) -> list[TextSet]:
    """The newest set of each name (of ``names``, else of every name), newest first, at
    most ``limit``."""
    newest: dict[str, int] = {}
    listed = session.execute(
        select(TextSet.id, TextSet.name).order_by(TextSet.date.desc(), TextSet.id.desc())
    )
    for set_id, name in listed:
        if (names is None or name in names) and name not in newest:
            newest[name] = set_id
    if names is not None:
        missing = sorted(set(names) - set(newest))
        if missing:
            raise NotFound(f"no text set named {', '.join(missing)}", code="text_set_not_found")
    ids = list(newest.values())[: limit or None]
    return [get_text_set(session=session, text_set_id=set_id) for set_id in ids]


# -- schedules ---------------------------------------------------------------------------


def check_time(value: dt.datetime | None) -> dt.datetime:
    if value is None:
        return utcnow()
    if value.tzinfo is None:
        raise BadRequest(
            "not_before needs a timezone, e.g. 2026-12-01T00:00:00Z", code="invalid_time"
        )
    if value.year > 9000:
        raise BadRequest("not_before is too far in the future", code="invalid_time")
    return value.astimezone(dt.UTC)


def create_schedule(
    *,
    session: Session,
    principal: Principal,
    settings: Settings,
    not_before: dt.datetime | None,
    names: Sequence[str] | None,
    limit: int | None,
    every_hours: float | None,
) -> tuple[MonitorSchedule, list[MonitorRun]]:
    start = check_time(not_before)
    if every_hours is not None and not 0 < every_hours <= MAX_EVERY_HOURS:
        raise BadRequest(
            f"every_hours must be above 0 and at most {MAX_EVERY_HOURS}", code="invalid_interval"
        )
    if names is not None:
        names = sorted({check_name(n) for n in names})
    chosen = newest_sets(session=session, names=names, limit=limit)
    size = sum(s.bytes for s in chosen)
    room = settings.max_job_payload_bytes - OWN_SAMPLES_BYTES
    if size > room:
        raise PayloadTooLarge(
            f"the chosen text sets hold {size} bytes; a monitoring job carries at most {room} "
            "besides the expert's samples: choose fewer (names, limit)",
            code="texts_too_large",
        )
    schedule = MonitorSchedule(
        not_before=start,
        every_hours=every_hours,
        text_sets={"names": names, "limit": limit},
        created_by=principal.name,
        created_at=utcnow(),
    )
    session.add(schedule)
    session.flush()
    experts = session.scalars(
        select(Expert).where(Expert.status == expert_svc.ACTIVE).order_by(Expert.id)
    ).all()
    runs = [
        run
        for expert in experts
        if (
            run := _queue_run(
                session,
                settings=settings,
                schedule=schedule,
                expert=expert,
                run_at=start,
                chosen=chosen,
            )
        )
        is not None
    ]
    audit.append(
        session,
        actor=principal.name,
        action="monitor.schedule",
        target=f"monitor_schedule:{schedule.id}",
        reason="",
        detail={
            "not_before": _iso(start),
            "every_hours": every_hours,
            "text_sets": [set_key(s) for s in chosen],
            "experts": len(runs),
            "actor_token": principal.token_id,
        },
    )
    return schedule, runs


def _iso(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def find_reference(*, session: Session, expert_id: str) -> Evaluation | None:
    """The expert's first own-domain evaluation by an arrival check or a monitoring run."""
    rows = session.execute(
        select(Evaluation, Job.payload)
        .join(Job, Job.id == Evaluation.job_id)
        .where(Evaluation.expert_id == expert_id, Evaluation.text_set == OWN)
        .order_by(Evaluation.id)
    ).all()
    for row in rows:
        evaluation: Evaluation = row[0]
        if row[1].get("purpose", "request") in REFERENCE_PURPOSES:
            return evaluation
    return None


def _queue_run(
    session: Session,
    *,
    settings: Settings,
    schedule: MonitorSchedule,
    expert: Expert,
    run_at: dt.datetime,
    chosen: Sequence[TextSet],
) -> MonitorRun | None:
    """One expert's monitoring job, not leased before ``run_at``; None when there is
    nothing to measure it on (no samples)."""
    version = expert_svc.get_version(session=session, expert=expert, version=None)
    reference = find_reference(session=session, expert_id=expert.id)
    own_version = version
    if reference is not None and reference.version is not None:
        own_version = expert_svc.get_version(
            session=session, expert=expert, version=reference.version
        )
    own = [t for t in samples_of(own_version) if t.strip()]
    if not own:
        return None
    text_sets: dict[str, list[str]] = {OWN: own}
    text_sets.update({set_key(s): list(s.texts) for s in chosen})
    payload = evaluations.evaluate_payload(
        text_sets=text_sets,
        expert=ResolvedExpert(expert=expert, version=version),
        purpose=PURPOSE,
    )
    payload["continuations"] = ContinuationRequest(
        text_set=OWN,
        prompts=settings.monitor_prompts,
        prompt_tokens=settings.monitor_prompt_tokens,
        new_tokens=settings.monitor_new_tokens,
    ).model_dump(mode="json")
    payload = EvaluatePayload.model_validate(payload).model_dump(mode="json")
    job = jobs_svc.create_job(
        session=session,
        kind=EVALUATE_KIND,
        payload=payload,
        created_by=ACTOR,
        max_attempts=settings.job_max_attempts,
    )
    job.run_after = run_at
    run = MonitorRun(
        job_id=job.id,
        schedule_id=schedule.id,
        expert_id=expert.id,
        version=version.version,
        run_at=run_at,
        reference_evaluation=reference.id if reference is not None else None,
    )
    session.add(run)
    session.flush()
    return run


def list_schedules(*, session: Session, limit: int) -> list[MonitorSchedule]:
    return list(
        session.scalars(select(MonitorSchedule).order_by(MonitorSchedule.id.desc()).limit(limit))
    )


def get_schedule(*, session: Session, schedule_id: int) -> MonitorSchedule:
    row = session.get(MonitorSchedule, schedule_id)
    if row is None:
        raise NotFound(f"no monitoring schedule {schedule_id}", code="schedule_not_found")
    return row


def cancel_schedule(
    *, session: Session, principal: Principal, schedule_id: int
) -> tuple[MonitorSchedule, list[str]]:
    """No more runs; its queued (not yet leased) jobs are cancelled. A leased one finishes
    and is recorded, but queues no next run."""
    schedule = get_schedule(session=session, schedule_id=schedule_id)
    if schedule.cancelled_at is not None:
        raise Conflict(f"schedule {schedule_id} is cancelled", code="schedule_cancelled")
    now = utcnow()
    schedule.cancelled_at = now
    schedule.cancelled_by = principal.name
    jobs = session.scalars(
        select(Job)
        .join(MonitorRun, MonitorRun.job_id == Job.id)
        .where(MonitorRun.schedule_id == schedule_id, Job.status == "queued")
    ).all()
    for job in jobs:
        job.status = "cancelled"
        job.error = f"monitoring schedule {schedule_id} cancelled"
        job.updated_at = job.finished_at = now
    session.flush()
    cancelled = sorted(job.id for job in jobs)
    audit.append(
        session,
        actor=principal.name,
        action="monitor.cancel",
        target=f"monitor_schedule:{schedule_id}",
        reason="",
        detail={"cancelled_jobs": cancelled, "actor_token": principal.token_id},
    )
    return schedule, cancelled


def schedule_view(session: Session, row: MonitorSchedule) -> dict[str, Any]:
    runs = session.scalars(select(MonitorRun).where(MonitorRun.schedule_id == row.id)).all()
    return {
        "id": row.id,
        "not_before": _iso(row.not_before),
        "every_hours": row.every_hours,
        "text_sets": row.text_sets,
        "created_by": row.created_by,
        "created_at": _iso(row.created_at),
        "cancelled_at": _iso(row.cancelled_at) if row.cancelled_at else None,
        "cancelled_by": row.cancelled_by,
        "runs": len(runs),
        "completed": sum(1 for r in runs if r.completed_at is not None),
        "flagged": sum(1 for r in runs if r.report_id is not None),
    }


# -- results -----------------------------------------------------------------------------


def on_result(
    *,
    session: Session,
    settings: Settings,
    job: Job,
    result: Mapping[str, Any],
    scores: Mapping[str, TextSetScore],
) -> MonitorRun | None:
    """A monitoring job's completion (its scores already recorded as evaluations): the
    numbers, a flag when they cross a threshold, and the schedule's next run."""
    run = session.get(MonitorRun, job.id)
    if run is None:
        return None  # queued by something other than a schedule: scores only
    asked = job.payload.get("continuations")
    raw = result.get("continuations")
    if asked is not None and raw is None:
        raise ValidationFailed(
            "this job asked for continuations: result.continuations is missing",
            code="invalid_result",
        )
    continued = ContinuationScore.model_validate(raw) if raw is not None else None
    own = scores.get(OWN)
    reference = find_reference(session=session, expert_id=run.expert_id)
    now = utcnow()
    run.completed_at = now
    if own is not None:
        run.own_bits_per_byte = own.bits_per_byte
    if reference is not None and own is not None:
        run.reference_evaluation = reference.id
        run.reference_bits_per_byte = reference.bits_per_byte
        run.worsening = relative_change(own.bits_per_byte, reference.bits_per_byte)
    if continued is not None:
        run.repetition = continued.repetition
        run.base_repetition = continued.base_repetition
    problems: list[str] = []
    if run.worsening is not None and run.worsening > settings.monitor_max_worsening:
        problems.append(
            f"its own-domain bits per byte worsened by {run.worsening:.2%} against its "
            f"reference (more than {settings.monitor_max_worsening:.2%})"
        )
    if (
        continued is not None
        and continued.repetition > settings.monitor_max_repetition
        and continued.repetition > continued.base_repetition
    ):
        problems.append(
            f"its greedy continuations repeat {continued.repetition:.2%} of their "
            f"{continued.ngram}-grams (the base's: {continued.base_repetition:.2%}; "
            f"threshold {settings.monitor_max_repetition:.2%})"
        )
    if problems:
        numbers = run_view(run)
        numbers.update(
            {
                "max_worsening": settings.monitor_max_worsening,
                "max_repetition": settings.monitor_max_repetition,
                "text_sets": {name: s.model_dump(mode="json") for name, s in scores.items()},
                "sample": continued.sample if continued is not None else "",
            }
        )
        report = reports.flag(
            session=session,
            expert_id=run.expert_id,
            reason=f"monitoring run {job.id}: " + "; ".join(problems),
            numbers=numbers,
        )
        run.report_id = report.id
    session.flush()
    _next_run(session, settings, run)
    return run


def _next_run(session: Session, settings: Settings, run: MonitorRun) -> MonitorRun | None:
    schedule = session.get(MonitorSchedule, run.schedule_id)
    if schedule is None or schedule.every_hours is None or schedule.cancelled_at is not None:
        return None
    expert = session.get(Expert, run.expert_id)
    if expert is None or expert.status != expert_svc.ACTIVE:
        return None  # disabled, withdrawn, quarantined: the chain ends here
    choice = schedule.text_sets or {}
    names = choice.get("names")
    try:
        chosen = newest_sets(session=session, names=names, limit=choice.get("limit"))
    except NotFound:
        # A named set was deleted since: measure the names that remain.
        remaining = set(session.scalars(select(TextSet.name).distinct()))
        kept = [n for n in names or [] if n in remaining]
        chosen = newest_sets(session=session, names=kept, limit=choice.get("limit"))
    room = settings.max_job_payload_bytes - OWN_SAMPLES_BYTES
    fits: list[TextSet] = []
    for text_set in chosen:
        if sum(s.bytes for s in fits) + text_set.bytes <= room:
            fits.append(text_set)
    run_at = run.run_at + dt.timedelta(hours=schedule.every_hours)
    return _queue_run(
        session, settings=settings, schedule=schedule, expert=expert, run_at=run_at, chosen=fits
    )


def list_runs(*, session: Session, expert_id: str | None, limit: int) -> list[MonitorRun]:
    stmt = select(MonitorRun).order_by(MonitorRun.run_at.desc(), MonitorRun.job_id)
    if expert_id is not None:
        stmt = stmt.where(MonitorRun.expert_id == expert_id)
    return list(session.scalars(stmt.limit(limit)))


def run_view(run: MonitorRun) -> dict[str, Any]:
    return {
        "job_id": run.job_id,
        "schedule_id": run.schedule_id,
        "expert_id": run.expert_id,
        "version": run.version,
        "run_at": _iso(run.run_at),
        "completed_at": _iso(run.completed_at) if run.completed_at else None,
        "own_bits_per_byte": run.own_bits_per_byte,
        "reference_evaluation": run.reference_evaluation,
        "reference_bits_per_byte": run.reference_bits_per_byte,
        "worsening": run.worsening,
        "repetition": run.repetition,
        "base_repetition": run.base_repetition,
        "report_id": run.report_id,
    }
