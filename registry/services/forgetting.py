"""Proof of forgetting: after a disable, evaluation jobs measure what the model loses
without the expert (docs/governance.md, "Proof of forgetting").

A disable (``moderation.set_status``, also through a report's resolution) calls
``enqueue`` in its transaction: one ``evaluate`` job (purpose ``forgetting``, subject
``ForgettingSubject``) and one ``forgetting_reports`` row

- per ready composition whose inputs (``composition_experts``) include the expert, or an
  expert withdrawn by lineage because of it (an average or a distillation made from it):
  the composition as its manifest says, and without all of them (``without_spec``);
- and one for the expert alone: the base with it inserted, and the base.

Each job's text sets are ``domain`` (the disabled expert's own datasheet samples, its
held-out text) and, for a composition, one per other expert in it, named by its id (that
expert's samples). The worker scores the base, the model with the expert and the model
without it on each set, on the same windows.

The jobs use the disabled expert on purpose: ``governance.cancel_jobs_using`` leaves
them alone, and the worker holding one's lease may download the experts its payload
names (``leased_reader``). ``on_result`` fills the report when the job completes; a job
that ends any other way (dead, failed, cancelled) shows its report ``failed`` with the
job's error. Re-enabling leaves the reports: they are history.

The functions take the caller's session and never commit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.db.models import (
    Composition,
    CompositionExpert,
    Expert,
    ExpertVersion,
    ForgettingReport,
    Job,
    utcnow,
)
from registry.errors import ValidationFailed
from registry.protocol import (
    AVERAGE,
    DISTILL,
    ENSEMBLE,
    EVALUATE_KIND,
    MIXTURE,
    EvaluatePayload,
    ExpertRef,
    ForgettingSubject,
    Manifest,
    TextSetScore,
    WithoutExpert,
    relative_change,
)
from registry.services import governance
from registry.services import jobs as jobs_svc
from registry.services.compositions import samples_of
from registry.services.tokens import Principal

PURPOSE = "forgetting"
DOMAIN = "domain"
PENDING, READY, FAILED = "pending", "ready", "failed"
# The measurement is the registry's own job: as many leases as a job gets by default
# (registry/settings.py, job_max_attempts).
MAX_ATTEMPTS = 3
# "without" for a distillation: its output is one expert made from all the inputs, which
# cannot be undone; the registry measures its teacher without the expert instead.
TEACHER = "teacher_ensemble"
BASE = "base"


def _ref(version: ExpertVersion) -> ExpertRef:
    return ExpertRef(
        id=version.expert_id,
        version=version.version,
        digest=f"sha256:{version.digest}",
        size=version.size,
    )


def _version(session: Session, expert_id: str, version: int) -> ExpertVersion | None:
    return session.get(ExpertVersion, (expert_id, version))


def without_spec(manifest: Manifest, removed: str | set[str]) -> tuple[WithoutExpert, str]:
    """How the composition is computed without ``removed`` (the disabled expert, and any
    expert withdrawn because of it), and its name in the report: the same method over the
    remaining experts (their manifest weights, renormalised by the worker; the base path as
    the manifest has it); an average re-merged from them; a distillation's teacher
    ensemble without them (``teacher_ensemble``); the base where no expert (or no weight)
    remains."""
    gone = {removed} if isinstance(removed, str) else removed
    kept = [(e, e.weight) for e in manifest.experts if e.id not in gone]
    base = WithoutExpert(method="base")
    if not kept:
        return base, BASE
    refs = [ExpertRef(id=e.id, version=e.version, digest=e.digest, size=e.size) for e, _ in kept]
    weights = [float(w) for _, w in kept if w is not None]
    given = weights if len(weights) == len(kept) else None
    if manifest.method == MIXTURE.name:
        return WithoutExpert(method=MIXTURE.name, experts=refs), MIXTURE.name
    if manifest.method == AVERAGE.name:
        params = {k: manifest.params[k] for k in ("merge", "density") if k in manifest.params}
        if given is not None and not sum(given) > 0:
            return base, BASE
        return WithoutExpert(
            method=AVERAGE.name, experts=refs, weights=given, params=params
        ), AVERAGE.name
    # ensemble, and distill's teacher: the ensemble a compose.ensemble job would build.
    with_base, base_weight = manifest.base_path()
    if given is not None and not sum(given) > 0:
        return base, BASE  # the remaining experts had no share of the prior
    name = TEACHER if manifest.method == DISTILL.name else ENSEMBLE.name
    spec = WithoutExpert(
        method=ENSEMBLE.name,
        experts=refs,
        weights=given,
        with_base=with_base,
        base_weight=base_weight if given is not None else None,
    )
    return spec, name


def _samples(version: ExpertVersion | None) -> list[str]:
    if version is None:
        return []
    return [t for t in samples_of(version) if t.strip()]


def _queue(
    session: Session,
    *,
    expert_version: ExpertVersion,
    composition: Composition | None,
    manifest: Manifest | None,
    without: WithoutExpert,
    without_method: str,
    text_sets: dict[str, list[str]],
    moderation_action: int | None,
    created_by: str,
) -> ForgettingReport:
    subject = ForgettingSubject(
        kind="forgetting",
        expert=_ref(expert_version),
        composition_id=composition.id if composition is not None else None,
        manifest=manifest,
        without=without,
    )
    payload = EvaluatePayload(
        base_revision=(
            manifest.base_revision if manifest is not None else expert_version.base_revision
        ),
        subject=subject,
        text_sets=text_sets,
        purpose=PURPOSE,
    ).model_dump(mode="json")
    job = jobs_svc.create_job(
        session=session,
        kind=EVALUATE_KIND,
        payload=payload,
        created_by=created_by,
        max_attempts=MAX_ATTEMPTS,
    )
    now = utcnow()
    report = ForgettingReport(
        expert_id=expert_version.expert_id,
        version=expert_version.version,
        composition_id=composition.id if composition is not None else None,
        method=manifest.method if manifest is not None else "expert",
        without_method=without_method,
        job_id=job.id,
        moderation_action=moderation_action,
        status=PENDING,
        created_at=now,
        updated_at=now,
    )
    session.add(report)
    return report


def enqueue(
    *, session: Session, expert: Expert, moderation_action: int | None, created_by: str
) -> list[ForgettingReport]:
    """Queue the forgetting measurements of a disable (module docstring). An expert
    version without samples has nothing to be measured on: no report for it."""
    reports: list[ForgettingReport] = []
    latest = _version(session, expert.id, expert.latest_version)
    domain = _samples(latest)
    if latest is not None and domain:
        reports.append(
            _queue(
                session,
                expert_version=latest,
                composition=None,
                manifest=None,
                without=WithoutExpert(method="base"),
                without_method=BASE,
                text_sets={DOMAIN: domain},
                moderation_action=moderation_action,
                created_by=created_by,
            )
        )
    # Every expert that left with it: itself, and each descendant now withdrawn by
    # lineage (an average or a distillation made from it); a composition that used any of
    # them is measured without all of them, on the disabled expert's own samples.
    removed = {expert.id} | {
        d.id
        for d in session.scalars(
            select(Expert).where(
                Expert.id.in_(governance.descendants(session, expert.id)),
                Expert.status == governance.WITHDRAWN_BY_LINEAGE,
            )
        )
    }
    compositions = session.scalars(
        select(Composition)
        .where(
            Composition.id.in_(
                select(CompositionExpert.composition_id).where(
                    CompositionExpert.expert_id.in_(sorted(removed))
                )
            ),
            Composition.status == "ready",
            Composition.manifest.is_not(None),
        )
        .order_by(Composition.id)
    )
    for composition in compositions:
        try:
            manifest = Manifest.model_validate(composition.manifest)
        except ValidationError:
            continue  # a manifest no worker could build: nothing to measure
        used = next((e for e in manifest.experts if e.id == expert.id), None)
        # The version the composition used; for one that used only a descendant, the
        # disabled expert's latest (its samples are the domain that should be forgotten).
        version = _version(session, expert.id, used.version) if used is not None else latest
        domain = _samples(version)
        if version is None or not domain:
            continue
        text_sets = {DOMAIN: domain}
        for other in manifest.experts:
            if other.id not in removed and other.id not in text_sets:
                texts = _samples(_version(session, other.id, other.version))
                if texts:
                    text_sets[other.id] = texts
        without, without_method = without_spec(manifest, removed)
        reports.append(
            _queue(
                session,
                expert_version=version,
                composition=composition,
                manifest=manifest,
                without=without,
                without_method=without_method,
                text_sets=text_sets,
                moderation_action=moderation_action,
                created_by=created_by,
            )
        )
    session.flush()
    return reports


def on_result(*, session: Session, job: Job, scores: Mapping[str, TextSetScore]) -> None:
    """The forgetting job completed: its report's numbers. A result without the numbers
    without the expert is refused (422 ``invalid_result``: nothing is stored)."""
    report = session.scalars(
        select(ForgettingReport).where(ForgettingReport.job_id == job.id)
    ).one_or_none()
    if report is None:
        return
    missing = sorted(n for n, s in scores.items() if s.without_bits_per_byte is None)
    if missing:
        raise ValidationFailed(
            "a forgetting measurement reports without_bits_per_byte on every text set; "
            f"missing on {', '.join(missing)}",
            code="invalid_result",
        )
    report.results = {
        name: {
            "with": s.bits_per_byte,
            "without": s.without_bits_per_byte,
            "base": s.base_bits_per_byte,
            "tokens": s.tokens,
            "bytes": s.bytes,
        }
        for name, s in scores.items()
    }
    report.status = READY
    report.error = None
    report.updated_at = utcnow()


def list_reports(*, session: Session, expert_id: str) -> list[tuple[ForgettingReport, Job]]:
    """An expert's reports, newest first, each with its job."""
    rows = session.execute(
        select(ForgettingReport, Job)
        .join(Job, Job.id == ForgettingReport.job_id)
        .where(ForgettingReport.expert_id == expert_id)
        .order_by(ForgettingReport.id.desc())
    )
    return [(r, j) for r, j in rows]


def _change(new: float | None, old: float | None) -> float | None:
    if new is None or old is None:
        return None
    return relative_change(new, old)


def report_view(report: ForgettingReport, job: Job) -> dict[str, Any]:
    """The report as the API answers it. ``domain``: the disabled expert's own samples,
    with it, without it and the base, and ``without_vs_base``, ``with_vs_base`` (relative
    changes); ``others``: each other expert's samples, with and without, and ``change``
    ((without - with) / with)."""
    status, error = report.status, report.error
    if status == PENDING and job.status in jobs_svc.FINAL and job.status != "succeeded":
        status, error = FAILED, job.error or f"job {job.id} {job.status}"
    results = report.results or {}
    domain = results.get(DOMAIN)
    subject = job.payload.get("subject", {}) if isinstance(job.payload, dict) else {}
    manifest = subject.get("manifest") or {}
    kept = {e.get("id") for e in subject.get("without", {}).get("experts", [])}
    # The experts the "without" model leaves out: the disabled one and any descendant.
    removed = sorted({e.get("id") for e in manifest.get("experts", [])} - kept) or [
        report.expert_id
    ]
    return {
        "id": report.id,
        "expert_id": report.expert_id,
        "version": report.version,
        "composition_id": report.composition_id,
        "method": report.method,
        "without_method": report.without_method,
        "removed": removed,
        "status": status,
        "error": error,
        "job_id": report.job_id,
        "moderation_action": report.moderation_action,
        "domain": None
        if domain is None
        else {
            "with": domain["with"],
            "without": domain["without"],
            "base": domain["base"],
            "without_vs_base": _change(domain["without"], domain["base"]),
            "with_vs_base": _change(domain["with"], domain["base"]),
        },
        "others": {
            name: {
                "with": r["with"],
                "without": r["without"],
                "change": _change(r["without"], r["with"]),
            }
            for name, r in sorted(results.items())
            if name != DOMAIN
        },
        "created_at": report.created_at.isoformat(),
        "updated_at": report.updated_at.isoformat(),
    }


def leased_reader(
    *, session: Session, principal: Principal | None, expert_id: str, digest: str | None
) -> str | None:
    """The forgetting job whose current lease ``principal`` (a worker token) holds and
    whose payload names this expert (and these weights, ``digest`` as stored: hex), or
    None. That worker may read the expert whatever its state: the measurement needs it
    (docs/governance.md, "Proof of forgetting"). The read is audited by the route."""
    if principal is None or principal.role != "worker" or principal.suspended:
        return None
    now = utcnow()
    jobs = session.scalars(
        select(Job).where(
            Job.status == "leased",
            Job.kind == EVALUATE_KIND,
            Job.lease_token_id == principal.token_id,
            Job.lease_expires_at > now,
        )
    )
    for job in jobs:
        if not isinstance(job.payload, dict) or job.payload.get("purpose") != PURPOSE:
            continue
        try:
            refs = EvaluatePayload.model_validate(job.payload).refs()
        except ValidationError:
            continue
        for ref in refs:
            if ref.id == expert_id and (digest is None or ref.digest == f"sha256:{digest}"):
                return job.id
    return None
