"""Completing a job: the most delicate write in the registry, as one sequence.

A worker completes the job it leased with a JSON result and, when the job's method
produces an expert (``registry.protocol.produces_expert``), the new expert's weights.
The sequence, fenced by the lease's token at both ends:

1. read (one short transaction): the job, still leased under this token, or already
   completed (then this is a repeated completion: the stored outcome is answered again);
   the result checked against the job's kind; for a new expert, its parents, its base and
   the datasheet the registry writes for it;
2. outside any transaction: the expert validated like any submission, its retrieval
   vectors embedded, its weights blob committed (blob before rows: a failure after this
   leaves an orphan for the garbage collector, never a row naming missing bytes);
3. write (one transaction): the fencing checked again, then the expert version, lineage,
   vectors, the composition's manifest (or the evaluation scores) and the job's success.

Only the bearer token that holds the lease may complete the job (403
``not_lease_holder`` otherwise). A completion refused as invalid (``not_lease_holder``,
or, from the lease holder, an output or result that fails its checks: any 400/422) counts
as a refusal of the worker token, recorded in a transaction of its own after the failed
one rolled back; an accepted completion resets the count (registry/services/workers.py).

A produced expert from a worker token the operator does not vouch for is stored
``quarantined`` and its composition ``verifying`` while a second worker checks it; that
check's completion is handed to registry/services/verification.py after step 1, and an
accepted-but-unchecked output does not reset its worker's refusal count.

``complete_job`` owns these transactions (registry/api/deps.py); the route only parses
the request and shapes the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from registry.db.models import BaseModel, Job
from registry.errors import BadRequest, ValidationFailed
from registry.faults import crash_point
from registry.protocol import EVALUATE_KIND, ComposePayload, ComposeResult, produces_expert
from registry.retrieval.embedders import Vectors
from registry.retrieval.service import Retrieval
from registry.services import (
    arrival,
    evaluations,
    forgetting,
    lineage,
    monitoring,
    verification,
    workers,
)
from registry.services import compositions as comp
from registry.services import experts as expert_svc
from registry.services import jobs as jobs_svc
from registry.services.base_models import get_base_model
from registry.services.staged import UploadedFile
from registry.services.tokens import Principal

if TYPE_CHECKING:
    from registry.runtime import Runtime


@dataclass(frozen=True)
class _Derived:
    """What the read transaction found for a produced expert."""

    base: BaseModel
    datasheet: bytes
    parent_weights: list[float] | None


@dataclass(frozen=True)
class _NewExpert:
    """A produced expert, validated and with its blob committed, waiting for its rows."""

    weights: UploadedFile
    validated: expert_svc.ValidatedExpert
    vectors: Vectors
    storage_key: str
    parent_weights: list[float] | None


def _check_output(kind: str, weights: UploadedFile | None) -> None:
    if produces_expert(kind) and weights is None:
        raise ValidationFailed(
            f"{kind} completes with the new expert's weights (multipart file 'weights')",
            code="missing_output",
        )
    if not produces_expert(kind) and weights is not None:
        raise BadRequest(f"{kind} produces no weights", code="unexpected_output")


def _replay(session: Session, job_id: str, principal: Principal) -> dict[str, Any]:
    """A completion that already happened: answer the job as it stands."""
    job = jobs_svc.get_job(session=session, job_id=job_id)
    return jobs_svc.job_view(job, viewer_token_id=principal.token_id)


@dataclass
class _Attempt:
    """How far a completion got: ``holder`` once its lease holder is confirmed."""

    holder: bool = False


def complete_job(
    *,
    session: Session,
    runtime: Runtime,
    principal: Principal,
    job_id: str,
    fencing_token: int,
    result: dict[str, Any],
    weights: UploadedFile | None,
) -> dict[str, Any]:
    """Apply a worker's completion; returns the job's view (also for a repeated one).
    409 ``lease_lost`` when the fencing token is no longer the job's; 403
    ``not_lease_holder`` when another bearer token holds the lease. A refused completion
    counts against the worker token (module docstring)."""
    attempt = _Attempt()
    try:
        view = _apply_completion(
            session=session,
            runtime=runtime,
            principal=principal,
            attempt=attempt,
            job_id=job_id,
            fencing_token=fencing_token,
            result=result,
            weights=weights,
        )
    except jobs_svc.NotLeaseHolder as exc:
        _refused(session, runtime, principal, exc.detail)
        raise
    except BadRequest as exc:
        if attempt.holder:
            _refused(session, runtime, principal, f"{exc.code}: {exc.detail}")
        raise
    return view


def _refused(session: Session, runtime: Runtime, principal: Principal, reason: str) -> None:
    if session.in_transaction():
        session.rollback()
    workers.record_refusal_now(
        session=session,
        token_id=principal.token_id,
        reason=reason,
        threshold=runtime.settings.worker_suspend_after_refusals,
    )


def _apply_completion(
    *,
    session: Session,
    runtime: Runtime,
    principal: Principal,
    attempt: _Attempt,
    job_id: str,
    fencing_token: int,
    result: dict[str, Any],
    weights: UploadedFile | None,
) -> dict[str, Any]:
    """The three steps of the module docstring."""
    # 1. read and check, in one short transaction.
    derived: _Derived | None = None
    with session.begin():
        job = jobs_svc.completion_target(
            session=session,
            job_id=job_id,
            fencing_token=fencing_token,
            token_id=principal.token_id,
        )
        if job is None:
            return _replay(session, job_id, principal)
        attempt.holder = True
        kind = job.kind
        _check_output(kind, weights)
        # A check of another worker's output (registry/services/verification.py).
        check = verification.find_check(session=session, job=job)
        if kind == EVALUATE_KIND:
            scores = evaluations.check_evaluation_result(job, result)
            checked = ComposeResult()
        else:
            scores = {}
            checked = comp.check_compose_result(job, result)
        quarantine = check is None and verification.needs_check(
            session=session, settings=runtime.settings, kind=kind, token_id=principal.token_id
        )
        if quarantine:
            verification.check_claim(job=job, checked=checked)
        if weights is not None and check is None:
            payload = ComposePayload.model_validate(job.payload)
            parent_weights = checked.weights or payload.weights
            parents = lineage.parents_of(session=session, job=job)
            base = get_base_model(session=session, revision=payload.base_revision)
            sheet = lineage.derived_datasheet(
                job=job, parents=parents, weights=parent_weights, created_by=job.created_by
            )
            derived = _Derived(base=base, datasheet=sheet, parent_weights=parent_weights)
    if check is not None:
        return verification.complete_check(
            session=session,
            runtime=runtime,
            principal=principal,
            check=check,
            job_id=job_id,
            fencing_token=fencing_token,
            result=result,
            checked=checked,
            scores=scores,
            weights=weights,
        )

    # 2. outside any transaction: validate, embed, commit the blob.
    made: _NewExpert | None = None
    if derived is not None and weights is not None:
        validated = expert_svc.validate_submission(
            base=derived.base,
            base_revision=derived.base.revision,
            weights_path=weights.path,
            datasheet=derived.datasheet,
            max_expert_bytes=runtime.settings.max_expert_bytes,
            max_datasheet_bytes=runtime.settings.max_datasheet_bytes,
        )
        made = _NewExpert(
            weights=weights,
            validated=validated,
            vectors=runtime.retrieval.vectors_for_samples(validated.samples),
            storage_key=runtime.store.commit(weights.path, weights.sha256),
            parent_weights=derived.parent_weights,
        )
        crash_point("complete.after_blob_commit")

    # 3. write, in one transaction, fenced again.
    with session.begin():
        job = jobs_svc.completion_target(
            session=session,
            job_id=job_id,
            fencing_token=fencing_token,
            token_id=principal.token_id,
        )
        if job is None:
            return _replay(session, job_id, principal)
        if kind == EVALUATE_KIND:
            evaluations.record_evaluations(session=session, job=job, checked=scores)
            # What the registry does with the scores, by why it queued the job
            # (EvaluatePayload.purpose; docs/governance.md).
            purpose = job.payload.get("purpose", "request")
            if purpose == arrival.PURPOSE:
                arrival.on_result(session=session, runtime=runtime, job=job, checked=scores)
            if purpose == forgetting.PURPOSE:
                forgetting.on_result(session=session, job=job, scores=scores)
            if purpose == monitoring.PURPOSE:
                monitoring.on_result(
                    session=session,
                    settings=runtime.settings,
                    job=job,
                    result=result,
                    scores=scores,
                )
        else:
            status = expert_svc.QUARANTINED if quarantine else expert_svc.ACTIVE
            output = (
                _record_expert(session, runtime.retrieval, job, made, status)
                if made is not None
                else None
            )
            expert_id = output["id"] if output is not None else None
            composition = comp.finish_composition(
                session=session,
                job=job,
                checked=checked,
                output=output,
                expert_id=expert_id,
                status=comp.VERIFYING if quarantine else comp.READY,
            )
            if quarantine:
                verification.start_check(
                    session=session,
                    settings=runtime.settings,
                    job=job,
                    composition=composition,
                    producer_token_id=principal.token_id,
                )
            # The ids are the registry's, never the worker's: an expert_id the result names
            # is dropped unless this completion made that expert (docs/governance.md,
            # "Authorization").
            result = {k: v for k, v in result.items() if k != "expert_id"}
            result["composition_id"] = composition.id
            if expert_id is not None:
                result["expert_id"] = expert_id
        jobs_svc.succeed(
            session=session,
            job=job,
            result=result,
            output_digest=made.weights.sha256 if made is not None else None,
        )
        if not quarantine:
            # A quarantined output is accepted as evidence only: its check resets the count.
            workers.reset_refusals(session=session, token_id=principal.token_id)
        view = jobs_svc.job_view(job, viewer_token_id=principal.token_id)
        crash_point("complete.in_row_transaction")
    crash_point("complete.after_row_commit")
    if made is not None:
        # Committed: this replica's index takes the new expert before the worker hears back.
        runtime.retrieval.sync()
    return view


def _record_expert(
    session: Session, retrieval: Retrieval, job: Job, made: _NewExpert, status: str
) -> dict[str, Any]:
    """The produced expert's rows: the version (owned by the job's submitter, in
    ``status``: active, or quarantined until checked), its lineage and its retrieval
    vectors; returns the composition's ``output``."""
    owner = Principal(token_id=0, name=job.created_by, role="contributor")
    expert, version = expert_svc.record_version(
        session=session,
        principal=owner,
        expert_id=None,
        validated=made.validated,
        digest=made.weights.sha256,
        size=made.weights.size,
        storage_key=made.storage_key,
        status=status,
    )
    lineage.record_lineage(
        session=session,
        expert_id=expert.id,
        version=version.version,
        parents=lineage.parents_of(session=session, job=job),
        weights=made.parent_weights,
    )
    retrieval.record_vectors(
        session=session, expert_id=expert.id, version=version.version, vectors=made.vectors
    )
    return {
        "id": expert.id,
        "version": version.version,
        "digest": f"sha256:{version.digest}",
        "size": version.size,
    }
