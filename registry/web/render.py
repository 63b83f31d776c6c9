"""How a page is made: the Jinja2 environment, the signed-in viewer, the security headers
every page carries, and errors shown as pages rather than problem+json.

Page routes are ``PageRoute``s on routers built by ``page_router()``: they are left out of
the OpenAPI document (they are not API), and any ``AgoraError`` a service raises becomes
an HTML page with the same status and the problem's detail and code. Every response of a
page route, errors included, carries ``SECURITY_HEADERS``: a Content-Security-Policy that
allows scripts and styles from this origin only (no inline script, no inline style, nothing
from elsewhere), ``frame-ancestors 'none'``, ``nosniff`` and ``no-store`` (pages show a
signed-in viewer's own state).
"""

from __future__ import annotations

import datetime as dt
import inspect
import json
import re
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute, APIRouter
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markdown_it import MarkdownIt
from markupsafe import Markup
from starlette.responses import HTMLResponse
from starlette.types import Scope

from registry.api.deps import RuntimeDep
from registry.errors import AgoraError, BadRequest, Unauthenticated
from registry.runtime import Runtime
from registry.web.sessions import CSRF_FIELD, SESSION_COOKIE, Viewer, lookup

TEMPLATES_DIR = Path(__file__).parent / "templates"
STATIC_DIR = Path(__file__).parent / "static"
STATIC_PATH = "/assets/web"
# A flash is one line of confirmation after a form's redirect (registry/web/moderation.py).
MAX_FLASH_CHARS = 400

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    )
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def secure(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


# -- markdown --------------------------------------------------------------------------------

# CommonMark with tables; ``html: False`` escapes raw HTML (a ``<script>`` in a datasheet is
# shown as text), and markdown-it's link check refuses javascript:, vbscript:, file: and
# data: URLs (but images' data:image/...).
_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")


# HTML comments (a generated datasheet's prompts to its author) are dropped, not shown as
# escaped text. Dropping one cannot make markup: the renderer escapes raw HTML anyway.
_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.DOTALL)


def markdown(text: str) -> Markup:
    text = _COMMENT.sub("", text)
    # Safe to mark: raw HTML is escaped by the renderer itself (``html: False``).
    return Markup(_MARKDOWN.render(text))  # noqa: S704


# -- formatting ------------------------------------------------------------------------------


def fmt_bpb(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def fmt_change(value: float | None) -> str:
    """A relative change as a signed percentage (-0.123 -> "−12.3%")."""
    if value is None:
        return "–"
    return f"{value * 100:+.1f}%".replace("-", "−")


def fmt_bytes(value: int | None) -> str:
    if value is None:
        return "–"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def fmt_time(value: dt.datetime | str | None) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def short(value: str | None, n: int = 12) -> str:
    if not value:
        return "–"
    return value if len(value) <= n else value[:n] + "…"


ENV = Environment(
    loader=FileSystemLoader(TEMPLATES_DIR),
    autoescape=select_autoescape(("html", "svg"), default_for_string=True),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
ENV.filters.update(
    bpb=fmt_bpb, change=fmt_change, bytes=fmt_bytes, time=fmt_time, short=short, md=markdown
)
ENV.globals.update(static=STATIC_PATH, csrf_field=CSRF_FIELD)


# -- the viewer ------------------------------------------------------------------------------


def _lookup(runtime: Runtime, session_id: str) -> Viewer | None:
    with runtime.sessions() as session, session.begin():
        return lookup(session=session, session_id=session_id)


async def current_viewer(request: Request, runtime: RuntimeDep) -> Viewer | None:
    """The signed-in viewer from the session cookie, or None (no cookie, or a session that
    ended, lapsed, or whose token was revoked). Kept on ``request.state`` for ``render``."""
    session_id = request.cookies.get(SESSION_COOKIE)
    viewer = await run_in_threadpool(_lookup, runtime, session_id) if session_id else None
    request.state.viewer = viewer
    return viewer


ViewerDep = Annotated[Viewer | None, Depends(current_viewer)]


# -- rendering -------------------------------------------------------------------------------


def render(request: Request, template: str, *, status: int = 200, **context: Any) -> HTMLResponse:
    """``template`` rendered with ``context`` plus ``viewer`` (or None), ``path`` and
    ``flash``: the line a form's redirect put in ``?flash=`` (shown escaped, cut to
    ``MAX_FLASH_CHARS``), unless ``context`` gives its own."""
    context.setdefault("flash", (request.query_params.get("flash") or "")[:MAX_FLASH_CHARS])
    html = ENV.get_template(template).render(
        viewer=getattr(request.state, "viewer", None), path=request.url.path, **context
    )
    return HTMLResponse(html, status_code=status)


def error_page(request: Request, exc: AgoraError) -> Response:
    """An ``AgoraError`` as a page: its status, title, detail and code; its headers kept."""
    response = render(
        request,
        "error.html",
        status=exc.status,
        title=exc.title,
        detail=exc.detail,
        code=exc.code,
        status_code=exc.status,
    )
    for name, value in (getattr(exc, "headers", None) or {}).items():
        response.headers[name] = value
    return response


async def problem_page(request: Request, exc: Exception) -> Response:
    """``exc`` answered by the app's exception handler for it (the one problem+json would
    come from), shown as an error page with the same status, code and Retry-After."""
    handler = next(
        (
            request.app.exception_handlers[cls]
            for cls in type(exc).__mro__
            if cls in request.app.exception_handlers
        ),
        None,
    )
    if handler is None:
        raise exc
    answer = handler(request, exc)
    if inspect.isawaitable(answer):
        answer = await answer
    body = json.loads(bytes(answer.body)) if answer.body else {}
    response = render(
        request,
        "error.html",
        status=answer.status_code,
        title=body.get("title", "Error"),
        detail=body.get("detail", ""),
        code=body.get("code", "internal_error"),
        status_code=answer.status_code,
    )
    if "retry-after" in answer.headers:
        response.headers["Retry-After"] = answer.headers["retry-after"]
    return response


class PageRoute(APIRoute):
    """A route that answers HTML: errors become pages, and every response is ``secure``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def run(request: Request) -> Response:
            try:
                response = await handler(request)
            except AgoraError as exc:
                if isinstance(exc, Unauthenticated) and "authorization" in request.headers:
                    # A failing Authorization header is the API's 401 problem on every
                    # route, pages included (registry/api/deps.py): browsers send none.
                    raise
                response = error_page(request, exc)
            except RequestValidationError as exc:
                first = exc.errors()[0] if exc.errors() else {}
                where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "body"))
                detail = f"{where}: {first.get('msg', 'invalid')}" if where else "invalid request"
                response = error_page(request, BadRequest(detail, code="invalid_request"))
            except Exception as exc:
                # Anything else (a database that is down, a bug): the API's handler decides
                # the status and logs it (registry/api/problems.py); the page shows it.
                response = await problem_page(request, exc)
            return secure(response)

        return run


def page_router() -> APIRouter:
    return APIRouter(route_class=PageRoute, include_in_schema=False)


class PageStatic(StaticFiles):
    """The pages' CSS and JavaScript, with the pages' security headers."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Cache-Control", "no-cache")
        return response
