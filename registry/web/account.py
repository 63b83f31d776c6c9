"""Signing in and out (docs/web.md, "Signing in").

``GET /sign-in`` shows a form for an API token; the form carries a fresh random value that
is also set in the ``agora_csrf`` cookie (double submit, against login CSRF). ``POST
/sign-in`` checks that pair first, then the token (registry/web/sessions.py): a new
server-side session whose random id is the ``agora_session`` cookie (HttpOnly,
SameSite=Strict, Secure over HTTPS); the token itself is never stored, in the cookie or
anywhere. ``POST /sign-out`` deletes the session row, so the old cookie signs in no one.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Form, Query, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from registry.api.deps import RuntimeDep, SessionDep
from registry.errors import Unauthenticated
from registry.web import sessions
from registry.web.render import ViewerDep, page_router, render
from registry.web.sessions import PRE_CSRF_COOKIE, SESSION_COOKIE, check_csrf, local_path

router = page_router()

OptionalField = Annotated[str | None, Form()]


def _https(request: Request) -> bool:
    return request.url.scheme == "https"


def _next(value: str | None) -> str:
    """Where to go once signed in: a local path, and never back to this form."""
    target = local_path(value)
    return "/" if target.startswith("/sign-in") else target


def _form(
    request: Request, *, next_path: str, error: str | None = None, status: int = 200
) -> HTMLResponse:
    """The sign-in form, with a fresh login-CSRF value in the form and in the cookie."""
    pre_csrf = sessions.new_secret()
    response = render(
        request,
        "sign_in.html",
        status=status,
        next=next_path,
        pre_csrf=pre_csrf,
        error=error,
        hours=request.app.state.runtime.settings.web_session_hours,
    )
    response.set_cookie(
        PRE_CSRF_COOKIE,
        pre_csrf,
        path="/",
        httponly=True,
        samesite="strict",
        secure=_https(request),
    )
    return response


@router.get("/sign-in")
def sign_in_page(
    request: Request,
    viewer: ViewerDep,
    next_path: Annotated[str | None, Query(alias="next")] = None,
) -> HTMLResponse:
    return _form(request, next_path=_next(next_path))


@router.post("/sign-in")
def sign_in(
    *,
    request: Request,
    runtime: RuntimeDep,
    session: SessionDep,
    token: OptionalField = None,
    next_path: Annotated[str | None, Form(alias="next")] = None,
    csrf_token: OptionalField = None,
) -> Response:
    check_csrf(expected=request.cookies.get(PRE_CSRF_COOKIE), sent=csrf_token)
    target = _next(next_path)
    hours = runtime.settings.web_session_hours
    try:
        session_id, _ = sessions.start(
            session=session,
            secret=token or "",
            hours=hours,
            previous=request.cookies.get(SESSION_COOKIE),
        )
    except Unauthenticated:
        error = "That token is unknown or has been revoked. Paste the whole token (agora_…)."
        return _form(request, next_path=target, error=error, status=401)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        session_id,
        max_age=int(hours * 3600),
        path="/",
        httponly=True,
        samesite="strict",
        secure=_https(request),
    )
    response.delete_cookie(
        PRE_CSRF_COOKIE, path="/", httponly=True, samesite="strict", secure=_https(request)
    )
    return response


@router.post("/sign-out")
def sign_out(
    request: Request,
    session: SessionDep,
    viewer: ViewerDep,
    csrf_token: OptionalField = None,
) -> RedirectResponse:
    """Ends the session server-side. A browser whose session already ended (lapsed, or its
    token revoked) has no CSRF secret to show; its dead row goes all the same."""
    if viewer is not None:
        check_csrf(expected=viewer.csrf, sent=csrf_token)
    session_id = request.cookies.get(SESSION_COOKIE)
    if session_id:
        sessions.end(session=session, session_id=session_id)
    response = RedirectResponse("/", status_code=303)
    response.delete_cookie(
        SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=_https(request)
    )
    return response
