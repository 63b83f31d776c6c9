"""Compositions and evaluations: requests resolved into jobs, and job results applied.

A request names experts (or sample texts, and retrieval picks the experts); the registry
resolves every reference to an immutable version and digest, checks that each is active
and fits the base, and queues a job whose payload (``ComposePayload``,
``EvaluatePayload``) holds everything a worker needs (it never reads the database). When
the job succeeds its result is applied here: a manifest (``Manifest``); for a method that
produces an expert (``MethodSpec.produces_expert``: average, distill) also a new expert,
stored like any other, with a datasheet the registry writes (lineage, license).

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

import yaml
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.db.models import (
    Composition,
    CompositionExpert,
    Evaluation,
    Expert,
    ExpertParent,
    ExpertVersion,
    Job,
    utcnow,
)
from registry.errors import (
    BadRequest,
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
    CompositionSubject,
    EvaluatePayload,
    EvaluationResult,
    ExpertRef,
    ExpertSubject,
    Manifest,
    ManifestExpert,
    ParamError,
    TextSetScore,
    method_cautions,
    relative_change,
)
from registry.services.base_models import get_base_model
from registry.services.ids import new_id
from registry.validation import parse_datasheet
from registry.validation.datasheet import Datasheet

MAX_EXPERTS = 16
_REF = re.compile(r"^(ex_[0-9A-Za-z]{1,64})(?:@([1-9][0-9]{0,8}))?$")
# A derived expert's datasheet quotes its parents' samples up to this many bytes (the
# datasheet limit on samples is 64 KiB).
DERIVED_SAMPLES_BYTES = 48 * 1024
MAX_TEXT_SET_NAME = 200


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
    if expert.status != "active":
        raise UnavailableForLegalReasons(
            f"expert {expert_id} is {expert.status}; it cannot be composed or evaluated",
            code="expert_disabled",
        )
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


def evaluate_payload(
    *,
    text_sets: Mapping[str, Sequence[str]],
    expert: ResolvedExpert | None = None,
    composition: Composition | None = None,
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
    ).model_dump(mode="json")


def get_composition(*, session: Session, composition_id: str) -> Composition:
    composition = session.get(Composition, composition_id)
    if composition is None:
        raise NotFound(f"no composition {composition_id!r}", code="composition_not_found")
    return composition


def check_servable(*, session: Session, composition: Composition) -> None:
    """451 if any expert the composition names, or the one it produced, is not active."""
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
        session.scalars(select(Expert.id).where(Expert.id.in_(ids), Expert.status != "active"))
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


def _invalid_result(exc: ValidationError) -> ValidationFailed:
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
        raise _invalid_result(exc) from None
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
) -> Composition:
    composition = get_composition(session=session, composition_id=job.payload["composition_id"])
    composition.manifest = build_manifest(composition=composition, checked=checked, output=output)
    composition.expert_id = expert_id
    composition.status = "ready"
    composition.updated_at = utcnow()
    session.flush()
    return composition


def _license(licenses: Sequence[str]) -> str:
    """The parents' common license, else their conjunction. SPDX's AND binds tighter than
    OR and the datasheet grammar has no parentheses, so a parent with an OR expression
    makes the conjunction inexpressible: the result is then a LicenseRef the datasheet's
    body spells out."""
    unique = sorted(set(licenses))
    if len(unique) == 1:
        return unique[0]
    if any(" OR " in lic for lic in unique):
        return "LicenseRef-agora-combined"
    return " AND ".join(unique)


def _union(values: Sequence[Sequence[str]]) -> list[str]:
    seen: dict[str, None] = {}
    for group in values:
        for v in group:
            seen.setdefault(str(v), None)
    return list(seen)


def derived_datasheet(
    *,
    job: Job,
    parents: Sequence[ResolvedExpert],
    weights: Sequence[float] | None,
    created_by: str,
) -> bytes:
    """The datasheet of an averaged or distilled expert, from its parents' datasheets."""
    method = job.payload["method"]
    verb = METHOD_SPECS[method].derived_name
    if verb is None:
        raise ValueError(f"{method} produces no expert")
    sheets: list[Datasheet] = [
        parse_datasheet(p.version.datasheet.encode("utf-8"), max_bytes=1 << 30) for p in parents
    ]
    names = [str(s.name) for s in sheets]
    samples = interleave([s.samples for s in sheets], DERIVED_SAMPLES_BYTES)
    parent_list = "; ".join(
        f"{p.expert.id} v{p.version.version} ({n})" for p, n in zip(parents, names, strict=True)
    )
    front: dict[str, Any] = {
        "name": f"{verb} of {' + '.join(names)}"[:200],
        "domain": (
            f"{verb} of {len(parents)} experts. " + " | ".join(str(s.domain) for s in sheets)
        )[:4000],
        "license": _license([str(s.license) for s in sheets]),
        "language": _union([list(s.language) for s in sheets]),
        "sources": [
            {
                "name": f"expert {p.expert.id} v{p.version.version}: {n}"[:200],
                "description": f"the parent expert's own sources, per its datasheet"
                f" (license {s.license})",
                "license": str(s.license),
            }
            for p, n, s in zip(parents, names, sheets, strict=True)
        ],
        "collection": (
            f"Computed by Agora job {job.id} ({method}, params "
            f"{yaml.safe_dump(job.payload.get('params', {}), default_flow_style=True).strip()}) "
            f"from the weights of {parent_list}."
        )[:4000],
        "token_count": sum(int(s.token_count) for s in sheets),
        "pii_handling": (
            "Inherited from the parents: "
            + " | ".join(f"{n}: {s.pii_handling}" for n, s in zip(names, sheets, strict=True))
        )[:4000],
        "intended_uses": _union([list(s.intended_uses) for s in sheets]),
        "out_of_scope_uses": _union([list(s.out_of_scope_uses) for s in sheets]) or None,
        "contact": f"{created_by} (Agora account that requested the composition)",
        "samples": samples,
        "parents": [
            {
                "expert_id": p.expert.id,
                "version": p.version.version,
                **({"weight": float(weights[i])} if weights is not None else {}),
            }
            for i, p in enumerate(parents)
        ],
        "tags": _union([list(s.tags) for s in sheets] + [["derived", method]]),
    }
    front = {k: v for k, v in front.items() if v is not None}
    licenses = "\n".join(
        f"- {p.expert.id} v{p.version.version} ({n}): {s.license}"
        for p, n, s in zip(parents, names, sheets, strict=True)
    )
    body = (
        f"\n# {front['name']}\n\nThis expert was produced by the Agora registry's job "
        f"{job.id} ({method}). Its parents and their licenses:\n\n{licenses}\n"
    )
    text = "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n" + body
    return text.encode("utf-8")


def parents_of(*, session: Session, job: Job) -> list[ResolvedExpert]:
    """The job's input experts, re-checked: one disabled since the request withdraws it."""
    return [
        resolve_expert(
            session=session,
            expert_id=ref["id"],
            version=int(ref["version"]),
            base_revision=job.payload["base_revision"],
        )
        for ref in job.payload["experts"]
    ]


def record_lineage(
    *,
    session: Session,
    expert_id: str,
    version: int,
    parents: Sequence[ResolvedExpert],
    weights: Sequence[float] | None,
) -> None:
    for i, p in enumerate(parents):
        session.add(
            ExpertParent(
                expert_id=expert_id,
                version=version,
                parent_id=p.expert.id,
                parent_version=p.version.version,
                weight=None if weights is None else float(weights[i]),
            )
        )
    session.flush()


# -- evaluations ---------------------------------------------------------------------------


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
        raise _invalid_result(exc) from None


def record_evaluations(*, session: Session, job: Job, checked: Mapping[str, TextSetScore]) -> None:
    subject = job.payload["subject"]
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
