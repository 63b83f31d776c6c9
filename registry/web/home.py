"""The home page and the composition page (docs/web.md, "Home" and "Compositions").

* ``GET /``: what Agora is, the registry's counts (registry/services/stats.py), and a
  search form (GET, so it works without JavaScript and a search is a link): sample text,
  a base revision (the newest preselected) and ``k``. With a text, the page lists the
  experts retrieval finds (the same search as ``POST /v1/search``), with their weights as
  percentages and bars. ``k`` is honoured or refused (400 ``invalid_k``), never clamped.
* ``POST /compose``: a signed-in contributor, moderator or admin asks for an ensemble of
  the experts found for the text (``request_composition``, as ``POST /v1/compositions``
  with ``texts`` and no experts). The form carries an idempotency key made when the page
  was rendered, so a double click makes one composition. Answers 303 to its page.
* ``GET /compositions/{id}``: the manifest, its job's state and progress, its result
  once ready (bits per byte on the request's text, next to the base's), its evaluations
  and its verification; 451 once an expert it uses is withdrawn.
* ``GET /compositions/{id}/progress``: the same state as JSON, polled by static/agora.js
  while the page is open (not API: left out of the OpenAPI document; its errors are
  problem+json).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import JSONResponse, RedirectResponse
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.responses import HTMLResponse, Response

from registry.api.common import idempotent_request
from registry.api.deps import RuntimeDep, SessionDep
from registry.db.models import BaseModel, Composition, Expert, Job
from registry.errors import BadRequest, Forbidden, base_model_not_found
from registry.protocol import ENSEMBLE, relative_change
from registry.retrieval.service import DEFAULT_TEMPERATURE
from registry.runtime import Runtime
from registry.services import compositions as comp
from registry.services import evaluations, stats, verification
from registry.services.base_models import list_base_models
from registry.services.jobs import FINAL
from registry.services.requests import request_composition
from registry.web.render import ViewerDep, fmt_bpb, fmt_change, page_router, render
from registry.web.sessions import CSRF_FIELD, Viewer, check_csrf

router = page_router()
# The JSON the composition page polls: errors stay problem+json (not PageRoute's pages).
progress_router = APIRouter(include_in_schema=False)

DEFAULT_K = 4
IDEMPOTENCY_FIELD = "idempotency_key"
COMPOSER_ROLES = ("contributor", "moderator", "admin")
_WHOLE_NUMBER = re.compile(r"[0-9]{1,9}")
_MAX_PROGRESS_MESSAGE = 200


# -- parsing ---------------------------------------------------------------------------------


def parse_k(raw: str | None, max_k: int) -> int:
    """The ``k`` a form sent (the default when it sent none); 400 ``invalid_k`` for
    anything but a whole number from 1 to ``max_k``."""
    if raw is None:
        return min(DEFAULT_K, max_k)
    if _WHOLE_NUMBER.fullmatch(raw.strip()) and 1 <= int(raw) <= max_k:
        return int(raw)
    raise BadRequest(
        f"k must be a whole number from 1 to {max_k} (the number of experts to find); "
        f"got {raw[:40]!r}",
        code="invalid_k",
    )


def compose_fingerprint(text: str | None, base: str | None, k: int) -> str:
    canonical = json.dumps({"text": text, "base": base, "k": k}, sort_keys=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def may_compose(viewer: Viewer | None) -> bool:
    return viewer is not None and viewer.principal.role in COMPOSER_ROLES


# -- the home page ---------------------------------------------------------------------------


def base_option(base: BaseModel) -> dict[str, Any]:
    return {"revision": base.revision, "name": base.name, "created_at": base.created_at}


def run_search(runtime: Runtime, *, text: str, base: str, k: int) -> list[dict[str, Any]]:
    """Retrieval's experts for ``text``, best first, as the page lists them."""
    hits = runtime.retrieval.search(
        texts=[text], base_revision=base, k=k, temperature=DEFAULT_TEMPERATURE
    )
    return [
        {
            "expert_id": hit.entry.id,
            "name": hit.entry.name,
            "domain": hit.entry.domain,
            "weight": hit.weight,
            "percent": round(hit.weight * 100, 1),
        }
        for hit in hits
    ]


@router.get("/")
def home(
    *,
    request: Request,
    runtime: RuntimeDep,
    session: SessionDep,
    viewer: ViewerDep,
    text: str | None = None,
    base: str | None = None,
    k: str | None = None,
) -> HTMLResponse:
    """404 ``base_model_not_found`` for an unknown base (or a search before any base is
    stored), 400 ``invalid_k`` / ``empty_texts``, 413 ``texts_too_large``."""
    max_k = runtime.settings.search_max_k
    chosen_k = parse_k(k, max_k)
    with session.begin():
        counts = stats.registry_counts(session=session)
        bases = [base_option(b) for b in list_base_models(session=session)]
    chosen_base = base if base is not None else (bases[0]["revision"] if bases else None)
    results = None
    if text is not None:
        if chosen_base is None:
            raise base_model_not_found("")
        results = run_search(runtime, text=text, base=chosen_base, k=chosen_k)
    return render(
        request,
        "home.html",
        counts=counts,
        bases=bases,
        text=text or "",
        base=chosen_base,
        k=chosen_k,
        max_k=max_k,
        results=results,
        may_compose=may_compose(viewer),
        idempotency_field=IDEMPOTENCY_FIELD,
        idempotency_key=secrets.token_urlsafe(18),
        here=str(request.url.path) + (f"?{request.url.query}" if request.url.query else ""),
    )


# -- requesting a composition ----------------------------------------------------------------


@router.post("/compose")
def compose(
    *,
    request: Request,
    runtime: RuntimeDep,
    session: SessionDep,
    viewer: ViewerDep,
    text: Annotated[str | None, Form()] = None,
    base: Annotated[str | None, Form()] = None,
    k: Annotated[str | None, Form()] = None,
    csrf: Annotated[str | None, Form(alias=CSRF_FIELD)] = None,
    idempotency_key: Annotated[str | None, Form(alias=IDEMPOTENCY_FIELD)] = None,
) -> Response:
    """303 to the new composition's page (or, for a repeated idempotency key, to the one
    it made). Signed out: 303 to the sign-in page (nothing is read or written, and there is
    no session whose CSRF secret the form could carry). 403 ``csrf_failed`` before
    anything else for a signed-in viewer; 403 ``insufficient_role`` for a worker."""
    if viewer is None:
        return RedirectResponse("/sign-in?next=/", status_code=303)
    check_csrf(expected=viewer.csrf, sent=csrf)
    if not may_compose(viewer):
        raise Forbidden(
            f"role {viewer.principal.role!r} may not request compositions; it needs one of "
            f"{', '.join(COMPOSER_ROLES)}",
            code="insufficient_role",
        )
    chosen_k = parse_k(k, runtime.settings.search_max_k)
    idem = idempotent_request(
        request, viewer.principal, idempotency_key, compose_fingerprint(text, base, chosen_k)
    )
    queued = request_composition(
        session=session,
        runtime=runtime,
        principal=viewer.principal,
        method=ENSEMBLE.name,
        base_revision=base or "",
        experts=None,
        texts=[text or ""],
        k=chosen_k,
        weights=None,
        params=None,
        temperature=DEFAULT_TEMPERATURE,
        idem=idem,
    )
    runtime.metrics.record_job(kind=ENSEMBLE.job_kind, event="queued")
    return RedirectResponse(f"/compositions/{queued.body['composition_id']}", status_code=303)


# -- the composition page --------------------------------------------------------------------


def _number(value: Any) -> float | None:
    """A finite number >= 0 from stored JSON (a worker's progress, a manifest), or None."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok and math.isfinite(value) and value >= 0 else None


def _count(value: float | None) -> float | int | None:
    return int(value) if value is not None and value.is_integer() else value


def job_state(job: Job | None) -> dict[str, Any]:
    """The job's status and progress (``done`` of ``total`` steps, and the worker's short
    message), as the page and its poll show them. A job that succeeded is complete, and a
    finished job has no message, whatever its last heartbeat said."""
    if job is None:
        return {"status": "unknown", "done": None, "total": None, "message": "", "final": True}
    progress = job.progress if isinstance(job.progress, dict) else {}
    done, total = _number(progress.get("done")), _number(progress.get("total"))
    if total is None or total <= 0 or done is None:
        done = total = None
    else:
        done = min(done, total)
    if job.status == "succeeded":
        done, total = 1.0, 1.0
    message = progress.get("message") if job.status not in FINAL else None
    return {
        "status": job.status,
        "done": _count(done),
        "total": _count(total),
        "message": str(message)[:_MAX_PROGRESS_MESSAGE] if message is not None else "",
        "final": job.status in FINAL,
    }


def composition_result(composition: Composition) -> dict[str, Any] | None:
    """Bits per byte of the ready composition on the request's text, next to the base's
    (the manifest's metrics); None before it is ready or without metrics."""
    if composition.status != comp.READY or not composition.manifest:
        return None
    metrics = composition.manifest.get("metrics") or {}
    bpb, base_bpb = (
        _number(metrics.get("bits_per_byte")),
        _number(metrics.get("base_bits_per_byte")),
    )
    if bpb is None:
        return None
    return {
        "bits_per_byte": bpb,
        "base_bits_per_byte": base_bpb,
        "relative_change": relative_change(bpb, base_bpb),
    }


def result_display(result: dict[str, Any] | None) -> dict[str, str] | None:
    """The result's numbers as the page prints them (4 decimals; a signed percentage)."""
    if result is None:
        return None
    return {
        "bits_per_byte": fmt_bpb(result["bits_per_byte"]),
        "base_bits_per_byte": fmt_bpb(result["base_bits_per_byte"]),
        "relative_change": fmt_change(result["relative_change"]),
    }


def expert_rows(session: Session, composition: Composition) -> list[dict[str, Any]]:
    """One row per expert: its reference (version, digest, size), its name, and its weight:
    the one the worker used once there is a manifest, else the one requested."""
    refs: list[dict[str, Any]] = composition.inputs.get("experts", [])
    weights = composition.inputs.get("weights")
    if composition.manifest is not None:
        weights = [e.get("weight") for e in composition.manifest.get("experts", [])]
    ids = [r["id"] for r in refs]
    names = dict(session.execute(select(Expert.id, Expert.name).where(Expert.id.in_(ids))).all())
    rows = []
    for i, ref in enumerate(refs):
        weight = _number(weights[i]) if weights is not None and i < len(weights) else None
        rows.append(
            {
                **ref,
                "name": names.get(ref["id"], ref["id"]),
                "weight": weight,
                "percent": None if weight is None else round(weight * 100, 1),
            }
        )
    return rows


def progress_body(session: Session, composition: Composition) -> dict[str, Any]:
    """What the page's script polls: the composition's status, its job's, and the result
    once ready (null before), as numbers and as the page prints them."""
    result = composition_result(composition)
    return {
        "composition_id": composition.id,
        "status": composition.status,
        "job": job_state(session.get(Job, composition.job_id)),
        "bits_per_byte": result["bits_per_byte"] if result else None,
        "base_bits_per_byte": result["base_bits_per_byte"] if result else None,
        "relative_change": result["relative_change"] if result else None,
        "display": result_display(result),
    }


def composition_context(
    session: Session, composition_id: str, viewer: Viewer | None
) -> dict[str, Any]:
    """Everything the composition page shows (404 unknown, 451 withdrawn), read in the
    caller's transaction. The job's error is shown to its requester and to staff."""
    composition = comp.get_composition(session=session, composition_id=composition_id)
    comp.check_servable(session=session, composition=composition)
    job = session.get(Job, composition.job_id)
    mine = viewer is not None and (
        viewer.is_staff or viewer.principal.name == composition.created_by
    )
    manifest = composition.manifest or {}
    return {
        "composition": comp.composition_view(composition),
        "experts": expert_rows(session, composition),
        "with_base": manifest.get("with_base"),
        "base_weight": _number(manifest.get("base_weight")),
        "progress": progress_body(session, composition),
        "job_error": job.error if job is not None and mine else None,
        "evaluations": [
            evaluations.evaluation_view(e)
            for e in evaluations.list_evaluations(session=session, composition_id=composition.id)
        ],
        "verification": verification.verification_view(session=session, composition=composition),
    }


@router.get("/compositions/{composition_id}")
def composition_page(
    composition_id: str, request: Request, session: SessionDep, viewer: ViewerDep
) -> HTMLResponse:
    """404 ``composition_not_found``; 451 ``expert_disabled`` (the detail names the
    withdrawn experts)."""
    with session.begin():
        context = composition_context(session, composition_id, viewer)
    return render(request, "composition.html", **context)


@progress_router.get("/compositions/{composition_id}/progress")
def composition_progress(composition_id: str, session: SessionDep) -> JSONResponse:
    """The composition page's live state (static/agora.js): problem+json 404
    ``composition_not_found`` or 451 ``expert_disabled``."""
    with session.begin():
        composition = comp.get_composition(session=session, composition_id=composition_id)
        comp.check_servable(session=session, composition=composition)
        body = progress_body(session, composition)
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


router.include_router(progress_router)
