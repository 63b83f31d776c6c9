"""The moderation page, for moderators and admins (docs/web.md, "Moderation").

``GET /moderation``: the open report queue with a resolve form per report, a form to
disable or enable any expert with a reason, the experts that are not active, the experts
the registry flagged (checks on arrival, monitoring) with their numbers, the newest proofs
of forgetting, and the audit log with the verification of its chain
(registry/services/dashboard.py). Signed out: a redirect to the sign-in form; another
role: a 403 page.

``POST /moderation/experts`` (disable / enable; the expert page's form posts here too,
with ``return_to``) and ``POST /moderation/reports/{id}`` (dismiss / disable) check the
form's CSRF token before anything else, make the same service calls as the API, and
answer 303 back to the page with a flash message in the query string.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from fastapi import Form, Query, Request
from starlette.responses import RedirectResponse, Response

from registry.api.deps import RuntimeDep, SessionDep
from registry.errors import BadRequest, Forbidden, NotFound
from registry.protocol.refs import INT32_MAX
from registry.services import dashboard
from registry.services.tokens import Principal
from registry.validation.text import text_problem
from registry.web.render import ViewerDep, page_router, render
from registry.web.sessions import Viewer, check_csrf, local_path

router = page_router()

PAGE = "/moderation"
OptionalField = Annotated[str | None, Form()]
# A flash message is a line; a longer reason is cut in the message (never in the record).
MAX_FLASH_CHARS = 300


def _staff(viewer: Viewer) -> Principal:
    if not viewer.is_staff:
        raise Forbidden(
            f"the moderation page is for moderators and admins; you are signed in as "
            f"{viewer.principal.name} ({viewer.principal.role})",
            code="insufficient_role",
        )
    return viewer.principal


def _form_principal(viewer: Viewer | None, csrf_token: str | None) -> Principal:
    """A moderation form's sender: its CSRF token checked first, then its role."""
    check_csrf(expected=viewer.csrf if viewer is not None else None, sent=csrf_token)
    assert viewer is not None  # a form without a session fails the check above
    return _staff(viewer)


def _text(name: str, value: str | None) -> str:
    """A form field as text the database can hold (400 ``invalid_characters``)."""
    text = value or ""
    problem = text_problem(text)
    if problem is not None:
        raise BadRequest(f"form field {name!r} {problem}", code="invalid_characters")
    return text


def _back(target: str, message: str) -> RedirectResponse:
    """303 to ``target`` with ``flash=message`` added to its query string."""
    if len(message) > MAX_FLASH_CHARS:
        message = message[: MAX_FLASH_CHARS - 1] + "…"
    parts = urlsplit(target)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "flash"]
    query.append(("flash", message))
    url = urlunsplit(("", "", parts.path, urlencode(query), parts.fragment))
    return RedirectResponse(url, status_code=303)


@router.get("/moderation")
def moderation_page(
    request: Request,
    session: SessionDep,
    viewer: ViewerDep,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    flash: Annotated[str | None, Query(max_length=1000)] = None,
) -> Response:
    if viewer is None:
        here = quote(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
        return RedirectResponse(f"/sign-in?next={here}", status_code=303)
    principal = _staff(viewer)
    with session.begin():
        page = dashboard.overview(session=session, principal=principal, audit_cursor=cursor)
        return render(request, "moderation.html", page=page, flash=flash, cursor=cursor)


@router.post("/moderation/experts")
def moderate_expert(
    *,
    runtime: RuntimeDep,
    session: SessionDep,
    viewer: ViewerDep,
    csrf_token: OptionalField = None,
    expert_id: OptionalField = None,
    action: OptionalField = None,
    reason: OptionalField = None,
    return_to: OptionalField = None,
) -> RedirectResponse:
    principal = _form_principal(viewer, csrf_token)
    done = dashboard.moderate_expert(
        session=session,
        retrieval=runtime.retrieval,
        principal=principal,
        expert_id=_text("expert_id", expert_id),
        action=_text("action", action),
        reason=_text("reason", reason),
    )
    verb = "Disabled" if done["action"] == "disable" else "Enabled"
    message = f"{verb} {done['expert_id']} ({done['reason']})"
    if done["action"] == "enable" and done["status"] != "active":
        message += f"; it is {done['status']}"
    return _back(local_path(return_to) if return_to else PAGE, message)


def _report_number(value: str) -> int:
    if not (value.isascii() and value.isdigit() and len(value) <= 10) or not (
        1 <= int(value) <= INT32_MAX
    ):
        raise NotFound(f"no report {value[:40]!r}", code="report_not_found")
    return int(value)


@router.post("/moderation/reports/{report_id}")
def resolve_report(
    *,
    report_id: str,
    runtime: RuntimeDep,
    session: SessionDep,
    viewer: ViewerDep,
    csrf_token: OptionalField = None,
    resolution: OptionalField = None,
    note: OptionalField = None,
) -> RedirectResponse:
    principal = _form_principal(viewer, csrf_token)
    report = dashboard.resolve_report(
        session=session,
        retrieval=runtime.retrieval,
        principal=principal,
        report_id=_report_number(report_id),
        resolution=_text("resolution", resolution),
        note=_text("note", note),
    )
    if report["status"] == "disabled":
        message = f"Report {report['id']}: disabled {report['expert_id']}"
    else:
        message = f"Report {report['id']} on {report['expert_id']} dismissed"
    if report["resolution"]:
        message += f" ({report['resolution']})"
    return _back(PAGE, message)
