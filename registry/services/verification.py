"""Checking what untrusted workers produce: a worker's output is evidence, not truth.

A job whose method produces an expert (``MethodSpec.produces_expert``) and that a worker
token the operator does not vouch for completed (``tokens.trusted`` false, not an admin;
or any token at all with ``verify_worker_outputs = "all"``) is applied in two steps:

1. its completion stores the new expert ``quarantined`` (not listed, not searchable, not
   composable; its files served only to its owner, moderators, admins and workers), its
   composition ``verifying``, and queues a **check** job that the producing token may not
   lease (``jobs.exclude_token_id``):

   * a method whose output is ``reproducible`` gets a **replica**: the same kind and
     payload. The replica's output must be the very bytes the producer sent or, when the
     bytes differ, the same metadata, tensor names, shapes and dtypes with values within
     ``verify_tensor_rtol`` of each tensor's largest magnitude (floats summed in another
     order differ in their last bits); and both must report the same weights and bits
     per byte;
   * any other gets an **evaluation** of the produced expert on the job's texts by a
     second worker: its bits per byte (and the base's) must be within
     ``verify_bits_per_byte_rtol`` of what the producer claimed.

2. the check completes through the normal completion path, which hands it here
   (``complete_check``): the verifier's own output is never stored (a replica's bytes are
   discarded; an evaluation's scores are kept as evaluations of the expert), and the
   verdict is applied in the transaction that records the check job's success:

   * **confirmed**: the expert becomes ``active`` (and enters search), the composition
     ``ready``; the two tokens' refusal counts start again;
   * **refuted**: the expert becomes ``rejected`` (a ``moderation_actions`` row holds the
     cause), the composition ``failed`` (its view says why), a refusal is recorded against
     the producer's token (registry/services/workers.py) and an ``audit_events`` row names
     both tokens. A verifier that is not trusted either is charged a refusal too: between
     two untrusted workers that disagree the registry cannot tell which one lied, so
     nothing goes active and both are counted; a liar is counted every time.

A check job that ends ``failed`` or ``dead`` (the verifiers could not run it) rejects the
output and fails the composition, with no refusal (``end_checks``). A moderator's
decision on the expert in the meantime stands: only a ``quarantined`` expert changes
state here. The trust policy, the states and the limits: docs/architecture.md, "Workers
that lie".
"""

from __future__ import annotations

import json
import math
import mmap
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.db.models import (
    BaseModel,
    Blob,
    Composition,
    Expert,
    Job,
    JobResult,
    ModerationAction,
    Token,
    utcnow,
)
from registry.errors import Conflict, ServiceUnavailable, ValidationFailed
from registry.protocol import (
    EVALUATE_KIND,
    ComposePayload,
    ComposeResult,
    TextSetScore,
    produces_expert,
    spec_for_kind,
)
from registry.retrieval import store as retrieval_store
from registry.services import compositions as comp
from registry.services import evaluations, workers
from registry.services import experts as expert_svc
from registry.services import jobs as jobs_svc
from registry.services.staged import UploadedFile
from registry.services.tokens import Principal
from registry.settings import Settings
from registry.validation import TensorInfo, read_header, validate_expert

if TYPE_CHECKING:
    from registry.runtime import Runtime

REPLICATE = "replicate"
EVALUATE = "evaluate"
CONFIRMED = "confirmed"
REFUTED = "refuted"
# The text set an evaluation check scores the produced expert on: the job's texts, which
# the producer's claimed ``metrics`` were measured on.
TEXT_SET = "texts"
# The metrics a check compares (``ComposeResult.metrics``, worker/handlers.py).
CHECKED_METRICS = ("bits_per_byte", "base_bits_per_byte")
ACTOR = "registry"
# The moderation actions a check records (``moderation_actions``), and the status each
# leaves the expert in.
VERIFY_ACTION = "verify"
REJECT_ACTION = "reject"
ACTIONS = {VERIFY_ACTION: expert_svc.ACTIVE, REJECT_ACTION: expert_svc.REJECTED}
REFUTED_ACTION = "output.refuted"
# Values compared per read: bounds the temporaries to a few MiB whatever the tensor.
_CHUNK_ELEMENTS = 1 << 20
_NUMPY_DTYPES: Mapping[str, str] = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}
# 2 ulps of each float dtype: two honest workers may round one last bit apart.
_ULPS = 2
_EPSILON: Mapping[str, float] = {
    "F64": float(np.finfo(np.float64).eps),
    "F32": float(np.finfo(np.float32).eps),
    "F16": float(np.finfo(np.float16).eps),
    "BF16": 2.0**-7,
}


# -- the policy ----------------------------------------------------------------------------


def is_trusted(*, session: Session, token_id: int | None) -> bool:
    """A token whose outputs go active unchecked: marked trusted by the operator
    (``agora admin create-token --trusted``; the embedded worker of ``agora serve``), or an
    admin's (who may enable any expert anyway)."""
    if token_id is None:
        return False
    token = session.get(Token, token_id)
    return token is not None and (bool(token.trusted) or token.role == "admin")


def mode_of(kind: str) -> str:
    """How an output of a ``kind`` job is checked: ``replicate`` or ``evaluate``."""
    spec = spec_for_kind(kind)
    return REPLICATE if spec is not None and spec.reproducible else EVALUATE


def needs_check(*, session: Session, settings: Settings, kind: str, token_id: int) -> bool:
    """Whether the expert a ``kind`` job completed by ``token_id`` produced is quarantined
    until a second worker checks it."""
    if not produces_expert(kind):
        return False
    if settings.verify_worker_outputs == "all":
        return True
    return not is_trusted(session=session, token_id=token_id)


def check_claim(*, job: Job, checked: ComposeResult) -> None:
    """An output checked by evaluation claims what the evaluation measures: its bits per
    byte on the job's texts (422 ``invalid_result`` otherwise)."""
    if mode_of(job.kind) != EVALUATE:
        return
    metrics = checked.metrics or {}
    if "bits_per_byte" not in metrics:
        raise ValidationFailed(
            f"result metrics.bits_per_byte is required: a {job.kind} output from an untrusted "
            "worker is checked against it by a second worker's evaluation",
            code="invalid_result",
        )
    if not any(t.strip() for t in ComposePayload.model_validate(job.payload).texts):
        raise ValidationFailed(
            f"job {job.id} has no texts: its output cannot have been measured on them",
            code="invalid_result",
        )


def start_check(
    *,
    session: Session,
    settings: Settings,
    job: Job,
    composition: Composition,
    producer_token_id: int,
) -> Job:
    """Queue the check of ``job``'s quarantined output (the composition's ``expert_id``),
    which ``producer_token_id`` may not lease; its ``composition_id`` ties it to the
    composition (module docstring)."""
    if composition.expert_id is None:
        raise ValueError(f"composition {composition.id} has no output to check")
    if mode_of(job.kind) == REPLICATE:
        kind, payload = job.kind, dict(job.payload)
    else:
        texts = [t for t in ComposePayload.model_validate(job.payload).texts if t.strip()]
        kind = EVALUATE_KIND
        expert = expert_svc.get_expert(session=session, expert_id=composition.expert_id)
        output = (composition.manifest or {}).get("output") or {}
        version = expert_svc.get_version(
            session=session, expert=expert, version=output.get("version")
        )
        payload = evaluations.evaluate_payload(
            text_sets={TEXT_SET: texts},
            expert=comp.ResolvedExpert(expert=expert, version=version),
        )
    check = jobs_svc.create_job(
        session=session,
        kind=kind,
        payload=payload,
        created_by=job.created_by,
        max_attempts=settings.job_max_attempts,
        composition_id=composition.id,
    )
    check.exclude_token_id = producer_token_id
    session.flush()
    return check


# -- a check job's completion ---------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """What a check job checks: the composition's quarantined output and its claim."""

    mode: str
    composition_id: str
    producer_job_id: str
    producer_token_id: int | None
    expert_id: str
    digest: str
    size: int
    storage_key: str
    base_revision: str
    expert_schema: dict[str, Any]
    claim: ComposeResult


def find_check(*, session: Session, job: Job) -> Check | None:
    """The check ``job`` is, or None for any other job: a check names a composition
    (``composition_id``) whose own job is another one."""
    if job.composition_id is None:
        return None
    composition = session.get(Composition, job.composition_id)
    if composition is None or composition.job_id == job.id:
        return None
    produced = session.get(JobResult, composition.job_id)
    output = (composition.manifest or {}).get("output")
    blob = session.get(Blob, produced.output_digest) if produced is not None else None
    base = session.get(BaseModel, composition.base_revision)
    if (
        produced is None
        or blob is None
        or base is None
        or not isinstance(output, dict)
        or composition.expert_id is None
    ):
        raise Conflict(
            f"job {job.id} checks composition {composition.id}, which holds no output",
            code="nothing_to_check",
        )
    return Check(
        mode=REPLICATE if job.kind != EVALUATE_KIND else EVALUATE,
        composition_id=composition.id,
        producer_job_id=composition.job_id,
        producer_token_id=produced.token_id,
        expert_id=composition.expert_id,
        digest=blob.digest,
        size=blob.size,
        storage_key=blob.storage_key,
        base_revision=composition.base_revision,
        expert_schema=dict(base.config.get("expert_schema") or {}),
        claim=ComposeResult.model_validate(produced.result),
    )


def complete_check(
    *,
    session: Session,
    runtime: Runtime,
    principal: Principal,
    check: Check,
    job_id: str,
    fencing_token: int,
    result: dict[str, Any],
    checked: ComposeResult,
    scores: Mapping[str, TextSetScore],
    weights: UploadedFile | None,
) -> dict[str, Any]:
    """Steps 2 and 3 of a check job's completion (registry/services/completion.py did
    step 1: fencing, the lease holder, the result's shape): compare, then record the
    verdict with the job's success in one transaction, fenced again."""
    settings = runtime.settings
    if check.mode == REPLICATE:
        assert weights is not None  # completion refuses a compose.* output without them
        cause = compare_replica(runtime=runtime, check=check, weights=weights, replica=checked)
    else:
        cause = compare_evaluation(settings=settings, check=check, scores=scores)
    with session.begin():
        job = jobs_svc.completion_target(
            session=session, job_id=job_id, fencing_token=fencing_token, token_id=principal.token_id
        )
        if job is None:
            again = jobs_svc.get_job(session=session, job_id=job_id)
            return jobs_svc.job_view(again, viewer_token_id=principal.token_id)
        if check.mode == EVALUATE:
            evaluations.record_evaluations(session=session, job=job, checked=scores)
        # The check job succeeds first: a refusal that suspends its worker's token below
        # then requeues only the jobs that token still holds.
        jobs_svc.succeed(
            session=session,
            job=job,
            result={
                # No expert_id of the worker's: ids are the registry's (completion.py).
                **{k: v for k, v in result.items() if k != "expert_id"},
                "composition_id": check.composition_id,
                "verification": verdict_of(check, cause),
            },
        )
        conclude(
            session=session,
            settings=settings,
            check=check,
            check_job_id=job.id,
            cause=cause,
            verifier_token_id=principal.token_id,
        )
        view = jobs_svc.job_view(job, viewer_token_id=principal.token_id)
    # Committed: an expert that became active joins this replica's index now.
    runtime.retrieval.sync()
    return view


def verdict_of(check: Check, cause: str | None) -> dict[str, Any]:
    """The verdict as the check job's result records it (``verification``)."""
    return {
        "verdict": CONFIRMED if cause is None else REFUTED,
        "mode": check.mode,
        "of_job": check.producer_job_id,
        "expert_id": check.expert_id,
        "cause": cause,
    }


def conclude(
    *,
    session: Session,
    settings: Settings,
    check: Check,
    check_job_id: str,
    cause: str | None,
    verifier_token_id: int,
) -> None:
    """Apply a check's verdict, ``cause`` None when it agrees (module docstring)."""
    now = utcnow()
    composition = comp.get_composition(session=session, composition_id=check.composition_id)
    expert = expert_svc.get_expert(session=session, expert_id=check.expert_id, for_update=True)
    producer = check.producer_token_id
    if cause is None:
        _set_expert_status(
            session,
            expert,
            expert_svc.ACTIVE,
            action=VERIFY_ACTION,
            reason=f"confirmed by check job {check_job_id} ({check.mode})",
        )
        if composition.status == comp.VERIFYING:
            composition.status = comp.READY
            composition.updated_at = now
        for token_id in (producer, verifier_token_id):
            if token_id is not None:
                workers.reset_refusals(session=session, token_id=token_id)
        session.flush()
        return
    _set_expert_status(
        session,
        expert,
        expert_svc.REJECTED,
        action=REJECT_ACTION,
        reason=f"check job {check_job_id} ({check.mode}) refuted the output: {cause}",
    )
    if composition.status == comp.VERIFYING:
        composition.status = comp.FAILED
        composition.updated_at = now
    threshold = settings.worker_suspend_after_refusals
    if producer is not None:
        workers.record_refusal(
            session=session,
            token_id=producer,
            reason=f"job {check.producer_job_id}: its output was refuted by check job "
            f"{check_job_id}: {cause}",
            threshold=threshold,
        )
    verifier_trusted = is_trusted(session=session, token_id=verifier_token_id)
    if verifier_trusted:
        workers.reset_refusals(session=session, token_id=verifier_token_id)
    else:
        workers.record_refusal(
            session=session,
            token_id=verifier_token_id,
            reason=f"check job {check_job_id} disagreed with job {check.producer_job_id} of "
            f"another untrusted token: {cause}",
            threshold=threshold,
        )
    workers.audit(
        session=session,
        actor=ACTOR,
        action=REFUTED_ACTION,
        subject=f"token:{producer}",
        detail={
            "job": check.producer_job_id,
            "check_job": check_job_id,
            "mode": check.mode,
            "composition": check.composition_id,
            "expert": check.expert_id,
            "verifier_token": verifier_token_id,
            "verifier_trusted": verifier_trusted,
            "cause": cause,
        },
    )
    session.flush()


def _set_expert_status(
    session: Session, expert: Expert, status: str, *, action: str, reason: str
) -> None:
    """Move a quarantined expert to ``status``, recorded as a moderation action of the
    registry's; an expert a moderator has moved out of quarantine meanwhile stays put."""
    if expert.status != expert_svc.QUARANTINED:
        return
    now = utcnow()
    expert.status = status
    expert.updated_at = now
    session.add(
        ModerationAction(expert_id=expert.id, action=action, reason=reason, actor=ACTOR, at=now)
    )
    session.flush()
    retrieval_store.bump(session=session, expert_id=expert.id)


def end_checks(*, session: Session, job_ids: Sequence[str]) -> None:
    """Check jobs among ``job_ids`` that ended ``failed`` or ``dead``: their output is
    rejected and their composition fails, with no refusal (nobody was shown to lie)."""
    if not job_ids:
        return
    rows = session.execute(
        select(Job.id, Job.status, Job.error, Composition.id, Composition.expert_id)
        .join(Composition, Composition.id == Job.composition_id)
        .where(
            Job.id.in_(list(job_ids)),
            Composition.job_id != Job.id,
            Composition.status == comp.VERIFYING,
        )
    ).all()
    now = utcnow()
    for job_id, status, error, composition_id, expert_id in rows:
        composition = comp.get_composition(session=session, composition_id=composition_id)
        composition.status = comp.FAILED
        composition.updated_at = now
        if expert_id is not None:
            expert = expert_svc.get_expert(session=session, expert_id=expert_id, for_update=True)
            _set_expert_status(
                session,
                expert,
                expert_svc.REJECTED,
                action=REJECT_ACTION,
                reason=f"its check, job {job_id}, ended {status}: {error or 'no error given'}",
            )
    session.flush()


# -- the view -------------------------------------------------------------------------------


def verification_view(*, session: Session, composition: Composition) -> dict[str, Any] | None:
    """The composition's check, for its view: ``{job_id, mode, state, cause}`` with state
    ``pending``, ``confirmed``, ``refuted`` or ``failed`` (the check job failed or died);
    None for a composition that needed none."""
    job = session.scalars(
        select(Job)
        .where(Job.composition_id == composition.id, Job.id != composition.job_id)
        .order_by(Job.id.desc())
        .limit(1)
    ).one_or_none()
    if job is None:
        return None
    state, cause = "pending", None
    recorded = (job.result or {}).get("verification")
    if job.status == "succeeded" and isinstance(recorded, dict):
        state, cause = str(recorded.get("verdict")), recorded.get("cause")
    elif job.status in ("failed", "dead"):
        state, cause = "failed", f"the check job ended {job.status}: {job.error}"
    return {
        "job_id": job.id,
        "mode": EVALUATE if job.kind == EVALUATE_KIND else REPLICATE,
        "state": state,
        "cause": cause,
    }


# -- comparisons ----------------------------------------------------------------------------


def _relative_gap(a: float, b: float) -> float:
    scale = max(abs(a), abs(b))
    return 0.0 if scale == 0 else abs(a - b) / scale


def compare_metrics(
    claimed: Mapping[str, Any] | None, measured: Mapping[str, Any] | None, *, rtol: float
) -> str | None:
    """The first of ``CHECKED_METRICS`` on which the claim and the measurement disagree
    (one has it and the other not, or they differ by more than ``rtol``), or None."""
    claimed, measured = claimed or {}, measured or {}
    for name in CHECKED_METRICS:
        a, b = claimed.get(name), measured.get(name)
        if a is None and b is None:
            continue
        if a is None or b is None:
            return f"metrics.{name}: claimed {a}, measured {b}"
        gap = _relative_gap(float(a), float(b))
        if gap > rtol:
            return (
                f"metrics.{name}: claimed {float(a):.6g}, measured {float(b):.6g} "
                f"(a relative gap of {gap:.3g}; the tolerance is {rtol:g})"
            )
    return None


def compare_evaluation(
    *, settings: Settings, check: Check, scores: Mapping[str, TextSetScore]
) -> str | None:
    """An evaluation check: the producer's claimed bits per byte (and the base's) against
    the second worker's measurement on the same texts."""
    score = scores.get(TEXT_SET)
    if score is None:
        return f"the evaluation has no score on {TEXT_SET!r}"
    measured = {"bits_per_byte": score.bits_per_byte}
    if score.base_bits_per_byte is not None:
        measured["base_bits_per_byte"] = score.base_bits_per_byte
    claimed = {k: v for k, v in (check.claim.metrics or {}).items() if k in measured}
    return compare_metrics(claimed, measured, rtol=settings.verify_bits_per_byte_rtol)


def _compare_weights(
    a: Sequence[float] | None, b: Sequence[float] | None, *, atol: float
) -> str | None:
    if a is None and b is None:
        return None
    if a is None or b is None or len(a) != len(b):
        return f"weights: the output reports {a}, the replica {b}"
    worst = max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)
    if worst > atol:
        return f"weights differ by up to {worst:.3g} (the tolerance is {atol:g}): {a} vs {b}"
    return None


def compare_replica(
    *, runtime: Runtime, check: Check, weights: UploadedFile, replica: ComposeResult
) -> str | None:
    """A replica check: the replica's file against the producer's (bytes, else values),
    then their reported weights and bits per byte. The replica's file is validated like
    any expert before its tensors are read (422 to its worker if it is not one)."""
    settings = runtime.settings
    cause: str | None = None
    if weights.sha256 != check.digest:
        validate_expert(
            weights.path,
            expert_schema=check.expert_schema,
            base_revision=check.base_revision,
            max_bytes=settings.max_expert_bytes,
        )
        with _stored_copy(runtime, check) as produced:
            cause = compare_files(produced, weights.path, rtol=settings.verify_tensor_rtol)
    return (
        cause
        or _compare_weights(check.claim.weights, replica.weights, atol=settings.verify_tensor_rtol)
        or compare_metrics(
            check.claim.metrics, replica.metrics, rtol=settings.verify_bits_per_byte_rtol
        )
    )


@contextmanager
def _stored_copy(runtime: Runtime, check: Check) -> Iterator[Path]:
    """The producer's stored file, copied into staging (the store may be S3) and checked
    against its digest; removed afterwards."""
    staged = runtime.staging.new_file()
    try:
        for chunk in runtime.store.iter_range(check.storage_key, 0, check.size):
            staged.write(chunk)
        staged.close()
        if staged.hexdigest() != check.digest:
            raise ServiceUnavailable(
                f"the stored blob sha256:{check.digest} does not match its digest",
                code="storage_corrupt",
            )
        yield staged.path
    finally:
        staged.discard()


def _close(a: Any, b: Any, *, rtol: float) -> bool:
    """JSON values equal, numbers (not booleans) within ``rtol`` of the larger or 1."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rtol=rtol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, rtol=rtol) for x, y in zip(a, b, strict=True))
    numbers = (int, float)
    if (
        isinstance(a, numbers)
        and isinstance(b, numbers)
        and not isinstance(a, bool)
        and not isinstance(b, bool)
    ):
        return abs(a - b) <= rtol * max(1.0, abs(a), abs(b))
    return bool(a == b) and type(a) is type(b)


def _compare_metadata(a: Mapping[str, str], b: Mapping[str, str], *, rtol: float) -> str | None:
    """The safetensors metadata: the same keys and values; a value that is JSON (the merge
    record with its weights) may differ in its numbers by ``rtol``."""
    if a.keys() != b.keys():
        return f"metadata keys differ: {sorted(a)} vs {sorted(b)}"
    for key in sorted(a):
        if a[key] == b[key]:
            continue
        try:
            same = _close(json.loads(a[key]), json.loads(b[key]), rtol=rtol)
        except ValueError:
            same = False
        if not same:
            return f"metadata {key!r} differs"
    return None


def _values(buf: mmap.mmap, dtype: str, offset: int, count: int) -> NDArray[np.float64]:
    if dtype == "BF16":
        raw = np.frombuffer(buf, dtype="<u2", count=count, offset=offset)
        return (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return np.frombuffer(buf, dtype=_NUMPY_DTYPES[dtype], count=count, offset=offset).astype(
        np.float64
    )


def _max_gap(
    *, buf_a: mmap.mmap, start_a: int, buf_b: mmap.mmap, start_b: int, info: TensorInfo
) -> tuple[float, float]:
    """(largest |a - b|, largest |a| or |b|) over two tensors of ``info``'s dtype and
    shape, whose data begin at ``start_a`` and ``start_b`` of their files."""
    itemsize = info.nbytes // max(info.numel, 1)
    gap = scale = 0.0
    for first in range(0, info.numel, _CHUNK_ELEMENTS):
        n = min(_CHUNK_ELEMENTS, info.numel - first)
        x = _values(buf_a, info.dtype, start_a + first * itemsize, n)
        y = _values(buf_b, info.dtype, start_b + first * itemsize, n)
        gap = max(gap, float(np.max(np.abs(x - y))))
        scale = max(scale, float(np.max(np.abs(x))), float(np.max(np.abs(y))))
    return gap, scale


def compare_files(a: Path, b: Path, *, rtol: float) -> str | None:
    """Two validated expert files: the same metadata (``_compare_metadata``), tensor
    names, dtypes and shapes, and every tensor within ``rtol`` (at least 2 ulps of its
    dtype) of its largest magnitude; None when they agree, else the first difference."""
    head_a, head_b = read_header(a), read_header(b)
    cause = _compare_metadata(head_a.metadata, head_b.metadata, rtol=rtol)
    if cause is not None:
        return cause
    by_a, by_b = head_a.by_name(), head_b.by_name()
    if by_a.keys() != by_b.keys():
        return f"tensor names differ: {sorted(set(by_a) ^ set(by_b))[:4]}"
    with (
        open(a, "rb") as fa,
        open(b, "rb") as fb,
        mmap.mmap(fa.fileno(), 0, access=mmap.ACCESS_READ) as buf_a,
        mmap.mmap(fb.fileno(), 0, access=mmap.ACCESS_READ) as buf_b,
    ):
        for name in sorted(by_a):
            ta, tb = by_a[name], by_b[name]
            if (ta.dtype, ta.shape) != (tb.dtype, tb.shape):
                return f"tensor {name}: {ta.dtype}{list(ta.shape)} vs {tb.dtype}{list(tb.shape)}"
            if ta.numel == 0:
                continue
            gap, scale = _max_gap(
                buf_a=buf_a,
                start_a=head_a.data_start + ta.begin,
                buf_b=buf_b,
                start_b=head_b.data_start + tb.begin,
                info=ta,
            )
            tolerance = max(rtol, _ULPS * _EPSILON[ta.dtype]) * scale
            if not math.isfinite(gap) or gap > tolerance:
                return (
                    f"tensor {name} differs by up to {gap:.3g} (the tolerance is "
                    f"{tolerance:.3g}, {rtol:g} of its largest magnitude {scale:.3g})"
                )
    return None
