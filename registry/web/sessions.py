"""Web sign-in: a server-side session behind an HttpOnly cookie, and CSRF tokens for forms.

A browser signs in once by pasting an API token into a form (``/sign-in``). The token is
checked like a bearer token (``tokens.authenticate``) and never stored: the registry keeps
one ``web_sessions`` row holding the sha256 of a fresh random session id, the token's id,
a CSRF secret and an expiry (``AGORA_WEB_SESSION_HOURS``). The cookie holds the random id
only. A revoked token ends its sessions at once (the lookup joins the live token); sign-out
deletes the row. Functions here take the caller's session and never commit.

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

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from registry.db.models import Token, WebSession, utcnow
from registry.errors import Forbidden, Unauthenticated
from registry.services.tokens import Principal, authenticate

SESSION_COOKIE = "agora_session"
PRE_CSRF_COOKIE = "agora_csrf"
CSRF_FIELD = "csrf_token"
_ID_BYTES = 32


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
    principal = authenticate(session=session, secret=secret.strip())
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
