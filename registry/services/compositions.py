"""Compositions: requests resolved into jobs, and job results applied.

A request names experts (or sample texts, and retrieval picks the experts); the registry
resolves every reference to an immutable version and digest, checks that each is active
and fits the base, and queues a job whose payload (``ComposePayload``,
``EvaluatePayload``) holds everything a worker needs (it never reads the database). When
the job succeeds its result is applied here: a manifest (``Manifest``); for a method that
produces an expert (``MethodSpec.produces_expert``: average, distill) also a new expert,
stored like any other, with a datasheet the registry writes (lineage, license:
``registry.services.lineage``). Evaluations are ``registry.services.evaluations``'.

Methods, their parameters and cautions (``average_may_harm``: the request's 202 and the
composition's view carry it as ``warnings``), the payloads, the manifest and the shapes of
job results are ``registry.protocol``'s; nothing here names a method. A composition
served as an ensemble has the unmodified base as one more path unless
``params.with_base`` is false; its manifest records ``with_base`` and the base's share of
the prior, ``base_weight``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.db.models import (
    Composition,
    CompositionExpert,
    Expert,
    ExpertVersion,
    Job,
    utcnow,
)
from registry.errors import (
    BadRequest,
    Conflict,
    NotFound,
    PayloadTooLarge,
    UnavailableForLegalReasons,
    ValidationFailed,
    expert_not_found,
    version_not_found,
)
from registry.protocol import (
    MANIFEST_FORMAT,
    METHOD_SPECS,
    METHODS,
    UNIFORM,
    WEIGHTED,
    ComposePayload,
    ComposeResult,
    ExpertRef,
    Manifest,
    ManifestExpert,
    ParamError,
    method_cautions,
)
from registry.services import governance
from registry.services.base_models import get_base_model
from registry.services.experts import QUARANTINED, REJECTED
from registry.services.ids import new_id
from registry.validation import parse_datasheet

MAX_EXPERTS = 16
# A composition is ``pending`` (its job queued or running), ``verifying`` (its job produced
# an expert from an untrusted worker, which a second worker checks), ``ready`` or
# ``failed`` (docs/architecture.md, "Workers that lie").
PENDING = "pending"
VERIFYING = "verifying"
READY = "ready"
FAILED = "failed"
_REF = re.compile(r"^(ex_[0-9A-Za-z]{1,64})(?:@([1-9][0-9]{0,8}))?$")


# -- requests ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedExpert:
    expert: Expert
    version: ExpertVersion

    def expert_ref(self) -> ExpertRef:
        return ExpertRef(
            id=self.expert.id,
            version=self.version.version,
            digest=f"sha256:{self.version.digest}",
            size=self.version.size,
        )

    def ref(self) -> dict[str, Any]:
        return self.expert_ref().model_dump(mode="json")


def parse_ref(ref: str) -> tuple[str, int | None]:
    match = _REF.match(ref.strip()) if isinstance(ref, str) else None
    if match is None:
        raise BadRequest(
            f"{ref!r} is not an expert reference (ex_... or ex_...@VERSION)",
            code="invalid_expert_ref",
        )
    return match.group(1), int(match.group(2)) if match.group(2) else None


def resolve_expert(
    *, session: Session, expert_id: str, version: int | None, base_revision: str | None
) -> ResolvedExpert:
    """An active expert version fit for ``base_revision`` (404 unknown, 451 disabled)."""
    expert = session.get(Expert, expert_id)
    if expert is None:
        raise expert_not_found(expert_id)
    if expert.status == QUARANTINED:
        raise Conflict(
            f"expert {expert_id} is quarantined until its check has run (a second "
            "worker's, or its check on arrival); it cannot be composed or evaluated yet",
            code="expert_quarantined",
        )
    if expert.status != "active":
        raise governance.unavailable(expert, what="it cannot be composed or evaluated")
    number = expert.latest_version if version is None else version
    row = session.get(ExpertVersion, (expert.id, number))
    if row is None:
        raise version_not_found(expert_id, number, expert.latest_version)
    if base_revision is not None and row.base_revision != base_revision:
        raise ValidationFailed(
            f"expert {expert_id} v{number} is for base {row.base_revision[:12]}, "
            f"not {base_revision[:12]}",
            code="base_mismatch",
        )
    return ResolvedExpert(expert=expert, version=row)


def check_texts(texts: Sequence[str], *, max_bytes: int, field: str = "texts") -> list[str]:
    if not all(isinstance(t, str) for t in texts):
        raise BadRequest(f"{field} must be strings", code="invalid_texts")
    kept = [t for t in texts if t.strip()]
    if not kept:
        raise BadRequest(f"{field} must hold at least one non-blank text", code="empty_texts")
    size = sum(len(t.encode("utf-8")) for t in kept)
    if size > max_bytes:
        raise PayloadTooLarge(
            f"{field} hold {size} bytes of UTF-8; the limit is {max_bytes}",
            code="texts_too_large",
        )
    return kept


def check_params(method: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """The method's parameters (``registry.protocol.METHOD_SPECS``), defaults filled in."""
    try:
        return dict(METHOD_SPECS[method].check_params(params))
    except ParamError as exc:
        raise BadRequest(str(exc), code="invalid_params") from None


def check_weights(weights: Sequence[float] | None, n: int) -> list[float] | None:
    if weights is None:
        return None
    ok = (
        len(weights) == n
        and all(
            isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
            for w in weights
        )
        and sum(weights) > 0
    )
    if not ok:
        raise BadRequest(
            f"weights must be {n} finite non-negative numbers, not all zero (one per expert)",
            code="invalid_weights",
        )
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def samples_of(version: ExpertVersion) -> tuple[str, ...]:
    return tuple(parse_datasheet(version.datasheet.encode("utf-8"), max_bytes=1 << 30).samples)


def interleave(groups: Sequence[Sequence[str]], max_bytes: int) -> list[str]:
    """Round-robin over the groups' texts (one of each in turn, so every expert is
    represented), stopping before the first text that would pass ``max_bytes`` of UTF-8."""
    pools = [list(g) for g in groups]
    texts: list[str] = []
    size = 0
    while any(pools):
        for pool in pools:
            if not pool:
                continue
            text = pool.pop(0)
            n = len(text.encode("utf-8"))
            if size + n > max_bytes:
                return texts
            texts.append(text)
            size += n
    return texts


@dataclass(frozen=True)
class CompositionRequest:
    method: str
    base_revision: str
    experts: list[ResolvedExpert]
    weights: list[float] | None
    texts: list[str]
    texts_given: bool
    params: dict[str, Any]
    retrieved: bool


def check_method(method: str) -> None:
    if method not in METHODS:
        raise BadRequest(f"method must be one of {', '.join(METHODS)}", code="invalid_method")


def resolve_request(
    *,
    session: Session,
    method: str,
    base_revision: str,
    experts: Sequence[str] | None,
    texts: Sequence[str] | None,
    k: int,
    weights: Sequence[float] | None,
    params: Mapping[str, Any] | None,
    retrieved: Sequence[tuple[str, int, float]] | None,
    max_text_bytes: int,
    max_k: int,
) -> CompositionRequest:
    """Check a composition request. ``retrieved`` holds (expert id, version, c-BTM
    weight) from the caller's search when the request gave texts and no experts."""
    check_method(method)
    spec = METHOD_SPECS[method]
    if not 1 <= k <= max_k:
        raise BadRequest(f"k must be between 1 and {max_k}", code="invalid_k")
    checked_params = check_params(method, params)
    given_weights = weights is not None
    get_base_model(session=session, revision=base_revision)
    kept_texts = check_texts(texts, max_bytes=max_text_bytes) if texts is not None else None
    resolved: list[ResolvedExpert] = []
    if experts is not None:
        refs = [parse_ref(r) for r in experts]
        if len({eid for eid, _ in refs}) != len(refs):
            raise BadRequest("an expert is named twice", code="duplicate_expert")
        resolved = [
            resolve_expert(session=session, expert_id=eid, version=v, base_revision=base_revision)
            for eid, v in refs
        ]
    elif retrieved is not None:
        resolved = [
            resolve_expert(session=session, expert_id=eid, version=v, base_revision=base_revision)
            for eid, v, _ in retrieved
        ]
        if weights is None and spec.retrieval_weights:
            weights = [w for _, _, w in retrieved]
    else:
        raise BadRequest("give experts, or texts to find them by", code="missing_experts")
    if not resolved:
        raise ValidationFailed(
            "no active expert of this base fits the texts", code="no_experts_found"
        )
    low = spec.min_experts
    if not low <= len(resolved) <= MAX_EXPERTS:
        raise BadRequest(
            f"{method} needs {low} to {MAX_EXPERTS} experts; got {len(resolved)}",
            code="too_few_experts" if len(resolved) < low else "too_many_experts",
        )
    if not spec.takes_weights and weights is not None and experts is not None:
        raise BadRequest(f"{method} routes per token: it takes no weights", code="invalid_weights")
    if not spec.takes_weights:
        weights = None
    weighting = spec.weighting
    if weighting is not None:
        # Weights given are weights used: with weights and no weighting named, the
        # method weighs them; a uniform one would ignore them, so asking for both is
        # refused. A uniform one records no weights (retrieval's scores were not used).
        named = weighting in (params or {})
        if given_weights and not named:
            checked_params[weighting] = WEIGHTED
        elif given_weights and checked_params[weighting] == UNIFORM:
            others = [c for c in spec.param(weighting).choices if c not in (UNIFORM, WEIGHTED)]
            raise BadRequest(
                f"a {UNIFORM} {method} ignores weights: leave weights out, or use "
                f"params.{weighting} = {WEIGHTED}"
                + (f" (or {', '.join(others)})" if others else ""),
                code="invalid_weights",
            )
        if checked_params[weighting] == UNIFORM:
            weights = None
    norm = check_weights(weights, len(resolved))
    if weighting is not None and checked_params[weighting] == WEIGHTED and norm is None:
        raise BadRequest(f"a {WEIGHTED} {method} needs weights", code="invalid_weights")
    if "base_weight" in checked_params:
        if weights is None:
            raise BadRequest(
                "params.base_weight is the base path's weight next to the experts': "
                "give weights too, or leave it out (the prior is then estimated)",
                code="invalid_params",
            )
        # On the scale of the given weights, which are normalised to sum 1 here: the base
        # keeps its ratio to them.
        checked_params["base_weight"] = checked_params["base_weight"] / float(sum(weights))
    payload_texts = (
        kept_texts
        if kept_texts is not None
        else interleave([samples_of(r.version) for r in resolved], max_text_bytes)
    )
    return CompositionRequest(
        method=method,
        base_revision=base_revision,
        experts=resolved,
        weights=norm,
        texts=payload_texts,
        texts_given=kept_texts is not None,
        params=checked_params,
        retrieved=experts is None,
    )


def record_composition(
    *, session: Session, request: CompositionRequest, created_by: str, job_id: str
) -> Composition:
    now = utcnow()
    composition = Composition(
        id=new_id("cmp"),
        method=request.method,
        base_revision=request.base_revision,
        status="pending",
        job_id=job_id,
        inputs={
            "experts": [r.ref() for r in request.experts],
            "weights": request.weights,
            "params": request.params,
            "retrieved": request.retrieved,
        },
        created_by=created_by,
        created_at=now,
        updated_at=now,
    )
    session.add(composition)
    session.flush()
    for position, r in enumerate(request.experts):
        session.add(
            CompositionExpert(
                composition_id=composition.id,
                position=position,
                expert_id=r.expert.id,
                version=r.version.version,
            )
        )
    session.flush()
    return composition


def compose_payload(request: CompositionRequest, composition_id: str) -> dict[str, Any]:
    """The ``compose.<method>`` job's payload, as stored (``ComposePayload``)."""
    return ComposePayload(
        composition_id=composition_id,
        method=request.method,
        base_revision=request.base_revision,
        experts=[r.expert_ref() for r in request.experts],
        weights=request.weights,
        texts=request.texts,
        params=request.params,
    ).model_dump(mode="json")


def get_composition(*, session: Session, composition_id: str) -> Composition:
    composition = session.get(Composition, composition_id)
    if composition is None:
        raise NotFound(f"no composition {composition_id!r}", code="composition_not_found")
    return composition


def check_servable(*, session: Session, composition: Composition) -> None:
    """451 if any expert the composition names, or the one it produced, is not active;
    the one it produced may be quarantined or rejected by its check, which the
    composition's own status says (``verifying``, ``failed``)."""
    ids = set(
        session.scalars(
            select(CompositionExpert.expert_id).where(
                CompositionExpert.composition_id == composition.id
            )
        )
    )
    if composition.expert_id is not None:
        ids.add(composition.expert_id)
    if not ids:
        return
    withdrawn = sorted(
        expert_id
        for expert_id, status in session.execute(
            select(Expert.id, Expert.status).where(Expert.id.in_(ids), Expert.status != "active")
        )
        if not (expert_id == composition.expert_id and status in (QUARANTINED, REJECTED))
    )
    if withdrawn:
        raise UnavailableForLegalReasons(
            f"composition {composition.id} uses withdrawn expert(s) {', '.join(withdrawn)}",
            code="expert_disabled",
        )


def method_warnings(method: str) -> list[dict[str, str]]:
    """The ``warnings`` a request for ``method`` is answered with (``METHOD_SPECS``' caution;
    [] for most methods). Derived from the method, never stored with the composition."""
    return [c.as_dict() for c in method_cautions(method)]


def composition_view(composition: Composition) -> dict[str, Any]:
    return {
        "id": composition.id,
        "method": composition.method,
        "base_revision": composition.base_revision,
        "status": composition.status,
        "job_id": composition.job_id,
        "experts": composition.inputs.get("experts", []),
        "weights": composition.inputs.get("weights"),
        "params": composition.inputs.get("params", {}),
        "warnings": method_warnings(composition.method),
        "manifest": composition.manifest,
        "expert_id": composition.expert_id,
        "created_by": composition.created_by,
        "created_at": composition.created_at.isoformat(),
        "updated_at": composition.updated_at.isoformat(),
    }


# -- results -------------------------------------------------------------------------------


def invalid_result(exc: ValidationError) -> ValidationFailed:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "result"
    return ValidationFailed(f"result {where}: {first['msg']}", code="invalid_result")


def check_compose_result(job: Job, result: Mapping[str, Any]) -> ComposeResult:
    """The worker's ``ComposeResult``, checked against the job: one weight per expert, and
    a base path (``with_base``, ``base_weight``) only where the method has one and as the
    request asked."""
    try:
        checked = ComposeResult.model_validate(result)
    except ValidationError as exc:
        raise invalid_result(exc) from None
    n = len(job.payload["experts"])
    if checked.weights is not None and len(checked.weights) != n:
        raise ValidationFailed(
            f"result weights must be a list of {n} numbers", code="invalid_result"
        )
    asked = METHOD_SPECS[job.payload["method"]].with_base(job.payload.get("params") or {})
    if checked.with_base is not None and checked.with_base != asked:
        raise ValidationFailed(
            f"result with_base is {str(checked.with_base).lower()}; the job asked for "
            f"{str(asked).lower()}",
            code="invalid_result",
        )
    if checked.base_weight is not None and (not asked or checked.weights is None):
        raise ValidationFailed(
            "result base_weight comes with the experts' weights of a composition with the "
            "base as a path",
            code="invalid_result",
        )
    return checked


def build_manifest(
    *,
    composition: Composition,
    checked: ComposeResult,
    output: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The agora.composition/1 manifest (``Manifest``). One served as an ensemble says
    ``with_base`` (whether the base is a path; manifests without the key predate it and
    were built without) and, when the worker reported it, ``base_weight`` (the base's
    share of the prior)."""
    spec = METHOD_SPECS[composition.method]
    experts = composition.inputs["experts"]
    weights = checked.weights if checked.weights is not None else composition.inputs["weights"]
    params = composition.inputs.get("params", {})
    ensemble = spec.serves_ensemble
    manifest = Manifest(
        format=MANIFEST_FORMAT,
        id=composition.id,
        method=composition.method,
        base_revision=composition.base_revision,
        experts=[
            ManifestExpert(**ref, weight=None if weights is None else weights[i])
            for i, ref in enumerate(experts)
        ],
        params=params,
        output=ExpertRef.model_validate(output) if output is not None else None,
        metrics=checked.metrics,
        with_base=spec.with_base(params) if ensemble else None,
        base_weight=checked.base_weight if ensemble else None,
    )
    return manifest.as_json()


def finish_composition(
    *,
    session: Session,
    job: Job,
    checked: ComposeResult,
    output: Mapping[str, Any] | None,
    expert_id: str | None,
    status: str = READY,
) -> Composition:
    """The job's result applied: the manifest, the produced expert, and ``status``
    (``ready``, or ``verifying`` while a second worker checks an untrusted output)."""
    composition = get_composition(session=session, composition_id=job.payload["composition_id"])
    composition.manifest = build_manifest(composition=composition, checked=checked, output=output)
    composition.expert_id = expert_id
    composition.status = status
    composition.updated_at = utcnow()
    session.flush()
    return composition
