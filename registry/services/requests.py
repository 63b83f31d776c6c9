"""Requests that become jobs: a composition (``compose.<method>``) or an evaluation.

Each is one write sequence that owns its transactions (registry/api/deps.py): the
Idempotency-Key reserved first, the request checked, then the job (and the composition
row) recorded in one transaction with the key's outcome, answered 202. The worker's
completion applies the result (registry/services/completion.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from registry.errors import BadRequest, Conflict
from registry.protocol import EVALUATE_KIND, METHOD_SPECS, EvaluationRequest
from registry.services import compositions as comp
from registry.services import evaluations
from registry.services import jobs as jobs_svc
from registry.services.idempotency import IdempotentRequest, StoredResponse, reserves_key
from registry.services.tokens import Principal

if TYPE_CHECKING:
    from registry.runtime import Runtime


@reserves_key
def request_composition(
    *,
    session: Session,
    runtime: Runtime,
    principal: Principal,
    method: str,
    base_revision: str,
    experts: Sequence[str] | None,
    texts: Sequence[str] | None,
    k: int,
    weights: Sequence[float] | None,
    params: dict[str, Any] | None,
    temperature: float,
    idem: IdempotentRequest,
) -> StoredResponse:
    """Queue a ``compose.<method>`` job and its composition: 202 with their ids and the
    method's ``warnings``. Without ``experts``, retrieval picks the top ``k`` for ``texts``."""
    settings = runtime.settings
    retrieved = None
    if experts is None and texts is not None:
        comp.check_method(method)  # before the search it would be wasted on
        hits = runtime.retrieval.search(
            texts=texts, base_revision=base_revision, k=k, temperature=temperature
        )
        retrieved = [(h.entry.id, h.entry.version, h.weight) for h in hits]

    def write(s: Session) -> StoredResponse:
        resolved = comp.resolve_request(
            session=s,
            method=method,
            base_revision=base_revision,
            experts=experts,
            texts=texts,
            k=k,
            weights=weights,
            params=params,
            retrieved=retrieved,
            max_text_bytes=settings.search_max_text_bytes,
            max_k=settings.search_max_k,
        )
        job = jobs_svc.create_job(
            session=s,
            kind=METHOD_SPECS[resolved.method].job_kind,
            payload={},
            created_by=principal.name,
            max_attempts=settings.job_max_attempts,
            idempotency_key=idem.key,
        )
        composition = comp.record_composition(
            session=s, request=resolved, created_by=principal.name, job_id=job.id
        )
        job.composition_id = composition.id
        job.payload = comp.compose_payload(resolved, composition.id)
        s.flush()
        # The warnings are part of the stored body: a replay answers them too.
        return StoredResponse(
            202,
            {
                "job_id": job.id,
                "composition_id": composition.id,
                "status": job.status,
                "warnings": comp.method_warnings(resolved.method),
            },
        )

    return idem.commit_or_replay(session, write)


@reserves_key
def request_evaluation(
    *,
    session: Session,
    runtime: Runtime,
    principal: Principal,
    request: EvaluationRequest,
    idem: IdempotentRequest,
) -> StoredResponse:
    """Queue an ``evaluate`` job for an expert version or a ready composition: 202."""
    settings = runtime.settings
    if (request.expert_id is None) == (request.composition_id is None):
        raise BadRequest("give expert_id or composition_id, not both", code="invalid_subject")
    text_sets = evaluations.check_text_sets(
        request.text_sets, max_bytes=settings.max_job_payload_bytes
    )

    def write(s: Session) -> StoredResponse:
        if request.expert_id is not None:
            expert = comp.resolve_expert(
                session=s,
                expert_id=request.expert_id,
                version=request.version,
                base_revision=None,
            )
            payload = evaluations.evaluate_payload(text_sets=text_sets, expert=expert)
        else:
            assert request.composition_id is not None
            composition = comp.get_composition(session=s, composition_id=request.composition_id)
            comp.check_servable(session=s, composition=composition)
            if composition.status != "ready" or composition.manifest is None:
                raise Conflict(
                    f"composition {composition.id} is {composition.status}, not ready",
                    code="composition_not_ready",
                )
            payload = evaluations.evaluate_payload(text_sets=text_sets, composition=composition)
        job = jobs_svc.create_job(
            session=s,
            kind=EVALUATE_KIND,
            payload=payload,
            created_by=principal.name,
            max_attempts=settings.job_max_attempts,
            idempotency_key=idem.key,
        )
        return StoredResponse(202, {"job_id": job.id, "status": job.status})

    return idem.commit_or_replay(session, write)
