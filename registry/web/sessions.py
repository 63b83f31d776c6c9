"""Web sign-in: a server-side session behind an HttpOnly cookie, and CSRF tokens for forms.

A browser signs in once by pasting an API token into a form (``/sign-in``). The token is
checked like a bearer token (``tokens.authenticate``) and never stored: the registry keeps
one ``web_sessions`` row holding the sha256 of a fresh random session id, the token's id,
a CSRF secret and an expiry (``AGORA_WEB_SESSION_HOURS``). The cookie holds the random id
only. A revoked token ends its sessions at once (the lookup joins the live token); sign-out
deletes the row. ``start`` and ``end`` are the sign-in and sign-out forms' writes and own
their transaction; the other functions take the caller's session and never commit.
``local_path`` keeps a form's ``next`` on this site (docs/web.md, "Signing in").

CSRF, two cases, both compared in constant time:

* signed in: each form carries the session's CSRF secret (``csrf_token``);
* signed out (the sign-in form itself, against login CSRF): a double-submit pair, a random
  value in the ``agora_csrf`` cookie (SameSite=Strict, HttpOnly) and the same value in the
  form.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from registry.db.models import Token, WebSession, utcnow
from registry.errors import Forbidden, Unauthenticated
from registry.services.tokens import Principal, authenticate

SESSION_COOKIE = "agora_session"
PRE_CSRF_COOKIE = "agora_csrf"
CSRF_FIELD = "csrf_token"
_ID_BYTES = 32
# No token is this long (``agora_`` and 43 characters); a longer paste is refused unhashed.
MAX_SECRET_CHARS = 512
MAX_PATH_CHARS = 2000


@dataclass(frozen=True)
class Viewer:
    """Who is looking at a page: the principal of a live web session, and the CSRF secret
    its forms carry."""

    principal: Principal
    csrf: str

    @property
    def is_staff(self) -> bool:
        return self.principal.role in ("moderator", "admin")


def _hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8")).hexdigest()


def new_secret() -> str:
    return secrets.token_urlsafe(_ID_BYTES)


def sign_in(*, session: Session, secret: str, hours: float) -> tuple[str, Viewer]:
    """A new web session for the token ``secret`` (401 ``invalid_token`` if it is unknown
    or revoked): the cookie value to set, and the viewer."""
    secret = secret.strip()
    # A token pasted with the header's scheme, as `curl -H` examples show it, is the token.
    if secret[:7].lower() == "bearer ":
        secret = secret[7:].strip()
    principal = None
    if len(secret) <= MAX_SECRET_CHARS:
        principal = authenticate(session=session, secret=secret)
    if principal is None:
        raise Unauthenticated("unknown or revoked token", code="invalid_token")
    session_id = new_secret()
    row = WebSession(
        id_hash=_hash(session_id),
        token_id=principal.token_id,
        csrf=new_secret(),
        expires_at=utcnow() + dt.timedelta(hours=hours),
    )
    session.add(row)
    # Lapsed sessions go when anyone signs in: the table holds live ones and a few more.
    session.execute(delete(WebSession).where(WebSession.expires_at < utcnow()))
    session.flush()
    return session_id, Viewer(principal=principal, csrf=row.csrf)


def lookup(*, session: Session, session_id: str) -> Viewer | None:
    """The viewer of a live session, or None (unknown, lapsed, or its token revoked)."""
    if not session_id or len(session_id) > 200:
        return None
    found = session.execute(
        select(WebSession, Token)
        .join(Token, Token.id == WebSession.token_id)
        .where(
            WebSession.id_hash == _hash(session_id),
            WebSession.expires_at > utcnow(),
            Token.revoked_at.is_(None),
        )
    ).one_or_none()
    if found is None:
        return None
    row, token = found
    principal = Principal(
        token_id=token.id,
        name=token.name,
        role=token.role,
        suspended=token.suspended_at is not None,
        trusted=token.trusted,
    )
    return Viewer(principal=principal, csrf=row.csrf)


def sign_out(*, session: Session, session_id: str) -> bool:
    """Ends the session server-side; True when there was one."""
    if not session_id:
        return False
    result = session.execute(delete(WebSession).where(WebSession.id_hash == _hash(session_id)))
    return bool(getattr(result, "rowcount", 0))


def check_csrf(*, expected: str | None, sent: str | None) -> None:
    """403 ``csrf_failed`` unless the form's token matches the one this browser holds."""
    if not expected or not sent or not hmac.compare_digest(expected, sent):
        raise Forbidden(
            "this form is stale or was not sent from Agora's own page: reload the page and "
            "submit it again",
            code="csrf_failed",
        )


def start(
    *, session: Session, secret: str, hours: float, previous: str | None
) -> tuple[str, Viewer]:
    """The sign-in form's write, in one transaction: the browser's previous session (if its
    cookie named one) ends and a new one begins (``sign_in``)."""
    with session.begin():
        if previous:
            sign_out(session=session, session_id=previous)
        return sign_in(session=session, secret=secret, hours=hours)


def end(*, session: Session, session_id: str) -> bool:
    """The sign-out form's write, in one transaction (``sign_out``)."""
    with session.begin():
        return sign_out(session=session, session_id=session_id)


def local_path(value: str | None) -> str:
    """``value`` if it is a path on this site ("/experts?q=law"), else "/": where a form may
    send the browser next (``next``, ``return_to``) without becoming an open redirect.
    Refused: a path starting "//" or holding a backslash (both name another host to a
    browser), anything with a scheme or a host, and spaces and control characters
    (browsers drop a tab or newline, so "/", tab, "/host" would be "//host")."""
    if not value or len(value) > MAX_PATH_CHARS or not value.startswith("/"):
        return "/"
    if value.startswith("//") or "\\" in value:
        return "/"
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in value):
        return "/"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return "/"
    return value
