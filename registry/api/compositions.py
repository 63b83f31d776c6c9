"""Compositions and evaluations: requests that become jobs for the workers.

``POST /v1/compositions`` resolves the experts (named, or found by retrieval from sample
texts), checks them, and queues a ``compose.<method>`` job; the answer is 202 with the
job and composition ids, and the method's ``warnings`` (``average_may_harm`` for
``average``: registry.protocol.AVERAGE_CAUTION). ``POST /v1/evaluations`` queues an
``evaluate`` job. Both are write sequences of registry/services/requests.py; results are
applied when the worker completes the job (registry/services/completion.py).
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from registry.api.common import idempotent_request, json_response
from registry.api.deps import RuntimeDep, SessionDep, require_roles
from registry.api.openapi import NOT_BLANK, problems
from registry.protocol import (
    EVALUATE_KIND,
    METHOD_SPECS,
    METHODS,
    EvaluationRequest,
    params_reference,
)
from registry.protocol.refs import JsonInt
from registry.retrieval.service import DEFAULT_TEMPERATURE, MAX_TEMPERATURE, MIN_TEMPERATURE
from registry.services import compositions as comp
from registry.services import evaluations, verification
from registry.services import experts as expert_svc
from registry.services.compositions import MAX_EXPERTS
from registry.services.requests import request_composition, request_evaluation
from registry.services.tokens import Principal
from registry.settings import Settings

router = APIRouter(tags=["compositions"])

_MAX_K = Settings.model_fields["search_max_k"].default

Requester = Annotated[Principal, Depends(require_roles("contributor", "moderator", "admin"))]


class CompositionIn(BaseModel):
    # Strict: a JSON true is not a number, nor "4" an integer (the schema says so). The
    # rules below are stated in the schema only (json_schema_extra): a refusal keeps its
    # own code (missing_experts, invalid_temperature, invalid_expert_ref, invalid_k...).
    model_config = ConfigDict(
        strict=True,
        json_schema_extra={
            # Experts named, or texts to find them by.
            "anyOf": [
                {"required": ["experts"], "properties": {"experts": {"type": "array"}}},
                {"required": ["texts"], "properties": {"texts": {"type": "array"}}},
            ],
            # The temperature is retrieval's: checked when retrieval picks the experts.
            "if": {"required": ["experts"], "properties": {"experts": {"type": "array"}}},
            "else": {
                "properties": {
                    "temperature": {"minimum": MIN_TEMPERATURE, "maximum": MAX_TEMPERATURE}
                }
            },
        },
    )

    method: str = Field(description=" | ".join(METHODS), json_schema_extra={"enum": list(METHODS)})
    base_revision: str
    experts: list[str] | None = Field(
        default=None,
        description="expert ids, optionally pinned: ex_...@VERSION",
        json_schema_extra={
            "maxItems": MAX_EXPERTS,
            "items": {"type": "string", "pattern": "^ex_[0-9A-Za-z]{1,64}(@[1-9][0-9]{0,8})?$"},
        },
    )
    texts: list[str] | None = Field(
        default=None,
        description=(
            "sample texts of the target domain: without experts, retrieval picks the top k; "
            "always the text an ensemble's prior and a distillation are fitted on"
        ),
        json_schema_extra={"minItems": 1, "contains": {"type": "string", "pattern": NOT_BLANK}},
    )
    k: JsonInt = Field(
        default=4,
        description="experts retrieval picks when none are named",
        json_schema_extra={"minimum": 1, "maximum": _MAX_K},
    )
    weights: list[float] | None = Field(
        default=None,
        description="one per expert (ensemble prior, weighted average); the registry "
        "normalises them to sum 1 (and scales params.base_weight with them)",
    )
    params: dict[str, Any] | None = Field(
        default=None,
        description="method parameters (400 invalid_params when unknown or out of bounds). "
        "An ensemble has the unmodified base as one more path unless params.with_base is "
        "false; its manifest says with_base.\n" + params_reference(),
    )
    temperature: float = Field(
        default=DEFAULT_TEMPERATURE,
        description="T of retrieval's weights softmax(-d^2/T), when retrieval picks the "
        f"experts: {MIN_TEMPERATURE} to {MAX_TEMPERATURE}",
    )


class QueuedOut(BaseModel):
    job_id: str
    status: str
    composition_id: str | None = None


class WarningOut(BaseModel):
    code: str = Field(description="stable, snake_case: e.g. average_may_harm")
    detail: str = Field(description="what was measured, and what to use instead")


class CompositionQueuedOut(QueuedOut):
    warnings: list[WarningOut] = Field(
        description="cautions about the method, e.g. average_may_harm for average (the "
        "parameter average of independent experts measurably harms); empty for most methods"
    )


def _fingerprint(body: BaseModel) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@router.post(
    "/v1/compositions",
    status_code=202,
    summary="Request a composition; a worker computes it (202 with the job id)",
    response_model=CompositionQueuedOut,
    responses=problems(
        {
            400: "invalid_method, invalid_params, invalid_k, invalid_weights, "
            "too_few_experts, missing_experts, duplicate_expert, empty_texts, invalid_texts",
            404: "base_model_not_found, expert_not_found, version_not_found",
            409: "expert_quarantined (awaiting its check by a second worker)",
            413: "texts_too_large",
            422: "base_mismatch, no_experts_found",
            451: "expert_disabled",
        }
    ),
)
def create_composition(
    *,
    body: CompositionIn,
    request: Request,
    runtime: RuntimeDep,
    session: SessionDep,
    principal: Requester,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONResponse:
    """Refusals: ``base_mismatch`` / ``no_experts_found`` (422), ``expert_disabled`` (451),
    ``base_model_not_found`` / ``expert_not_found`` / ``version_not_found`` (404),
    ``invalid_method`` / ``invalid_params`` / ``invalid_k`` / ``invalid_weights`` /
    ``too_few_experts`` / ``missing_experts`` (400), ``texts_too_large`` (413).

    ``ensemble`` (and ``distill``'s teacher) has the unmodified base as one more path,
    the null expert the posterior falls back on, unless ``params.with_base`` is false;
    ``params.base_weight`` is its prior weight next to ``weights``.

    ``warnings`` holds the method's cautions: ``average_may_harm`` for ``average`` (a
    parameter average of independently trained experts measurably harms; prefer
    ``ensemble`` or ``distill``); an empty list otherwise."""
    idem = idempotent_request(request, principal, idempotency_key, _fingerprint(body))
    response = request_composition(
        session=session,
        runtime=runtime,
        principal=principal,
        method=body.method,
        base_revision=body.base_revision,
        experts=body.experts,
        texts=body.texts,
        k=body.k,
        weights=body.weights,
        params=body.params,
        temperature=body.temperature,
        idem=idem,
    )
    runtime.metrics.record_job(kind=METHOD_SPECS[body.method].job_kind, event="queued")
    return json_response(response)


@router.get(
    "/v1/compositions/{composition_id}",
    summary="A composition and, once ready, its manifest",
    responses=problems({404: "composition_not_found", 451: "expert_disabled"}),
)
def get_composition(composition_id: str, session: SessionDep) -> dict[str, Any]:
    """451 ``expert_disabled`` when an expert it uses (or produced) has been withdrawn.
    ``warnings``: the method's cautions, as the request's 202 gave them. ``status`` is
    ``pending``, ``verifying`` (an untrusted worker's output awaits a second worker's
    check), ``ready`` or ``failed``; ``verification`` is that check (``job_id``, ``mode``:
    replicate or evaluate, ``state``: pending, confirmed, refuted or failed, ``cause``),
    null when none was needed."""
    with session.begin():
        composition = comp.get_composition(session=session, composition_id=composition_id)
        comp.check_servable(session=session, composition=composition)
        view = comp.composition_view(composition)
        view["verification"] = verification.verification_view(
            session=session, composition=composition
        )
        return view


@router.get(
    "/v1/compositions/{composition_id}/evaluations",
    summary="Evaluations of a composition, newest first",
)
def composition_evaluations(composition_id: str, session: SessionDep) -> dict[str, Any]:
    with session.begin():
        comp.get_composition(session=session, composition_id=composition_id)
        rows = evaluations.list_evaluations(session=session, composition_id=composition_id)
        return {"items": [evaluations.evaluation_view(e) for e in rows]}


@router.get(
    "/v1/experts/{expert_id}/evaluations",
    summary="Evaluations of an expert (base + the expert), newest first",
    tags=["experts"],
)
def expert_evaluations(expert_id: str, session: SessionDep) -> dict[str, Any]:
    with session.begin():
        expert_svc.get_expert(session=session, expert_id=expert_id)
        rows = evaluations.list_evaluations(session=session, expert_id=expert_id)
        return {"items": [evaluations.evaluation_view(e) for e in rows]}


@router.post(
    "/v1/evaluations",
    status_code=202,
    summary="Score an expert or a composition on named text sets (a worker computes it)",
    response_model=QueuedOut,
    responses=problems(
        {
            400: "invalid_subject, invalid_text_sets",
            404: "expert_not_found, version_not_found, composition_not_found",
            409: "composition_not_ready, expert_quarantined",
            413: "texts_too_large",
            451: "expert_disabled",
        }
    ),
)
def create_evaluation(
    *,
    body: EvaluationRequest,
    request: Request,
    runtime: RuntimeDep,
    session: SessionDep,
    principal: Requester,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONResponse:
    """Refusals: ``invalid_subject`` (400), ``expert_not_found`` / ``version_not_found`` /
    ``composition_not_found`` (404), ``composition_not_ready`` (409), ``expert_disabled``
    (451)."""
    idem = idempotent_request(request, principal, idempotency_key, _fingerprint(body))
    response = request_evaluation(
        session=session, runtime=runtime, principal=principal, request=body, idem=idem
    )
    runtime.metrics.record_job(kind=EVALUATE_KIND, event="queued")
    return json_response(response)
