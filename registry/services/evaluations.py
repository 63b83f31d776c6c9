"""Evaluations: an expert version or a ready composition scored against the base on
named text sets by a worker (``evaluate`` jobs): the payload (``EvaluatePayload``), the
checked result (``EvaluationResult``) recorded as one row per text set, and the views.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.db.models import Composition, Evaluation, Job, utcnow
from registry.errors import BadRequest, PayloadTooLarge, ValidationFailed
from registry.protocol import (
    CompositionSubject,
    EvaluatePayload,
    EvaluationResult,
    ExpertSubject,
    Manifest,
    TextSetScore,
    relative_change,
)
from registry.services.compositions import ResolvedExpert, check_texts, invalid_result

MAX_TEXT_SET_NAME = 200


def evaluate_payload(
    *,
    text_sets: Mapping[str, Sequence[str]],
    expert: ResolvedExpert | None = None,
    composition: Composition | None = None,
    purpose: str = "request",
) -> dict[str, Any]:
    """The ``evaluate`` job's payload, as stored (``EvaluatePayload``): one subject, an
    expert version or a ready composition (its manifest), on the base it was made for."""
    subject: ExpertSubject | CompositionSubject
    if expert is not None and composition is None:
        subject = ExpertSubject(kind="expert", expert=expert.expert_ref())
        base_revision = expert.version.base_revision
    elif composition is not None and expert is None and composition.manifest is not None:
        subject = CompositionSubject(
            kind="composition",
            composition_id=composition.id,
            manifest=Manifest.model_validate(composition.manifest),
        )
        base_revision = composition.base_revision
    else:
        raise ValueError("an evaluation has one subject: an expert, or a ready composition")
    return EvaluatePayload(
        base_revision=base_revision,
        subject=subject,
        text_sets={name: list(texts) for name, texts in text_sets.items()},
        purpose=purpose,
    ).model_dump(mode="json")


def check_text_sets(
    text_sets: Mapping[str, Sequence[str]], *, max_bytes: int
) -> dict[str, list[str]]:
    if not isinstance(text_sets, Mapping) or not text_sets:
        raise BadRequest("text_sets must map names to lists of texts", code="invalid_text_sets")
    out: dict[str, list[str]] = {}
    total = 0
    for name, texts in text_sets.items():
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_TEXT_SET_NAME:
            raise BadRequest(
                f"text set names must be 1 to {MAX_TEXT_SET_NAME} characters",
                code="invalid_text_sets",
            )
        if not isinstance(texts, list | tuple):
            raise BadRequest(f"text_sets[{name!r}] must be a list", code="invalid_text_sets")
        kept = check_texts(texts, max_bytes=max_bytes, field=f"text_sets[{name!r}]")
        total += sum(len(t.encode("utf-8")) for t in kept)
        out[name] = kept
    if total > max_bytes:
        raise PayloadTooLarge(
            f"text_sets hold {total} bytes of UTF-8; the limit is {max_bytes}",
            code="texts_too_large",
        )
    return out


def check_evaluation_result(job: Job, result: Mapping[str, Any]) -> dict[str, TextSetScore]:
    """The worker's ``EvaluationResult``: one score per text set of the job."""
    expected = set(job.payload["text_sets"])
    results = result.get("results")
    if not isinstance(results, Mapping) or set(results) != expected:
        raise ValidationFailed(
            f"result.results must have one entry per text set: {', '.join(sorted(expected))}",
            code="invalid_result",
        )
    try:
        return dict(EvaluationResult.model_validate(result).results)
    except ValidationError as exc:
        raise invalid_result(exc) from None


def record_evaluations(*, session: Session, job: Job, checked: Mapping[str, TextSetScore]) -> None:
    subject = job.payload["subject"]
    if subject["kind"] == "forgetting":
        return  # its numbers are its forgetting report's (registry/services/forgetting.py)
    expert_id = version = composition_id = None
    if subject["kind"] == "expert":
        expert_id = subject["expert"]["id"]
        version = int(subject["expert"]["version"])
    else:
        composition_id = subject["composition_id"]
    now = utcnow()
    for name, r in checked.items():
        session.add(
            Evaluation(
                job_id=job.id,
                expert_id=expert_id,
                version=version,
                composition_id=composition_id,
                text_set=name,
                bits_per_byte=r.bits_per_byte,
                base_bits_per_byte=r.base_bits_per_byte,
                tokens=r.tokens,
                bytes=r.bytes,
                created_by=job.created_by,
                created_at=now,
            )
        )
    session.flush()


def list_evaluations(
    *, session: Session, expert_id: str | None = None, composition_id: str | None = None
) -> list[Evaluation]:
    stmt = select(Evaluation)
    if expert_id is not None:
        stmt = stmt.where(Evaluation.expert_id == expert_id)
    if composition_id is not None:
        stmt = stmt.where(Evaluation.composition_id == composition_id)
    return list(session.scalars(stmt.order_by(Evaluation.id.desc()).limit(500)))


def evaluation_view(e: Evaluation) -> dict[str, Any]:
    return {
        "id": e.id,
        "job_id": e.job_id,
        "expert_id": e.expert_id,
        "version": e.version,
        "composition_id": e.composition_id,
        "text_set": e.text_set,
        "bits_per_byte": e.bits_per_byte,
        "base_bits_per_byte": e.base_bits_per_byte,
        # Computed here from the two stored numbers, not taken from the worker.
        "delta_vs_base": relative_change(e.bits_per_byte, e.base_bits_per_byte),
        "tokens": e.tokens,
        "bytes": e.bytes,
        "created_by": e.created_by,
        "created_at": e.created_at.isoformat(),
    }
