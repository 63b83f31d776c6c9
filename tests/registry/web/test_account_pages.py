"""Signing in and out through the pages' forms, on SQLite and PostgreSQL: the session
cookie's attributes, login CSRF, where ``next`` may lead, sign-out ending the session on
the server, and a revoked token ending its sessions (docs/web.md, "Signing in")."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from http.cookies import SimpleCookie
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from registry.db.models import WebSession

Read = Callable[[str], Any]


def set_cookies(response: httpx.Response) -> dict[str, dict[str, str]]:
    """Each Set-Cookie of ``response``: name -> its value and attributes (keys and the
    attributes' values lower-case; flags such as httponly map to "true")."""
    found: dict[str, dict[str, str]] = {}
    for header in response.headers.get_list("set-cookie"):
        parsed: SimpleCookie = SimpleCookie()
        parsed.load(header)
        for name, morsel in parsed.items():
            attrs = {k: str(v).lower() for k, v in morsel.items() if v}
            found[name] = {"value": morsel.value, **attrs, "raw": header}
    return found


def sign_in_form(client: TestClient, read: Read, next_path: str | None = None) -> dict[str, str]:
    """GET /sign-in: the form's hidden fields (csrf_token, next)."""
    params = {"next": next_path} if next_path is not None else None
    page = client.get("/sign-in", params=params)
    assert page.status_code == 200, page.text
    form = read(page.text).find(id="sign-in")
    assert (form.attrs["method"], form.attrs["action"]) == ("post", "/sign-in")
    return {
        i.attrs["name"]: i.attrs.get("value", "") for i in form.find_all("input", type="hidden")
    }


def post_sign_in(client: TestClient, fields: dict[str, str], token: str) -> httpx.Response:
    return client.post("/sign-in", data={**fields, "token": token}, follow_redirects=False)


def session_rows(app: FastAPI) -> list[WebSession]:
    with app.state.runtime.sessions() as session:
        return list(session.scalars(select(WebSession)))


def signed_in_as(client: TestClient, read: Read) -> str | None:
    """Who the pages say is signed in (the header's ``#signed-in-as``), or None."""
    page = read(client.get("/sign-in").text)
    if page.has(id="signed-in-as"):
        return str(page.find(id="signed-in-as").text.split()[0])
    assert page.has(id="sign-in-link")
    return None


def session_csrf(client: TestClient, read: Read) -> str:
    """The signed-in session's CSRF secret, from the header's sign-out form."""
    form = read(client.get("/sign-in").text).find("form", action="/sign-out")
    return str(form.find("input", name="csrf_token").attrs["value"])


def test_sign_in_sets_a_strict_httponly_cookie_that_is_not_the_token(
    app: FastAPI, client: TestClient, tokens: Any, web_html: Read
) -> None:
    page = client.get("/sign-in", params={"next": "/moderation"})
    assert page.status_code == 200
    form = web_html(page.text).find(id="sign-in")
    token_input = form.find("input", name="token")
    assert (token_input.attrs["type"], token_input.attrs["autocomplete"]) == ("password", "off")
    pre = set_cookies(page)["agora_csrf"]
    assert (pre["httponly"], pre["samesite"], pre["path"]) == ("true", "strict", "/")
    assert "secure" not in pre
    fields = {i.attrs["name"]: i.attrs["value"] for i in form.find_all("input", type="hidden")}
    assert fields["next"] == "/moderation"
    assert fields["csrf_token"] == pre["value"]

    response = post_sign_in(client, fields, tokens.moderator)
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/moderation"
    cookies = set_cookies(response)
    cookie = cookies["agora_session"]
    assert (cookie["httponly"], cookie["samesite"], cookie["path"]) == ("true", "strict", "/")
    assert cookie["max-age"] == str(12 * 3600)
    assert "secure" not in cookie
    # The login-CSRF cookie is spent.
    assert cookies["agora_csrf"]["max-age"] == "0"
    # Neither the cookie nor any header holds the token; the row holds the id's hash only.
    assert cookie["value"] != tokens.moderator
    assert tokens.moderator not in str(response.headers)
    (row,) = session_rows(app)
    assert row.id_hash == hashlib.sha256(cookie["value"].encode()).hexdigest()
    assert tokens.moderator not in (row.id_hash, row.csrf)
    assert cookie["value"] not in (row.id_hash, row.csrf)
    assert signed_in_as(client, web_html) == "moderator"


def test_over_https_both_cookies_are_secure(
    app: FastAPI, client: TestClient, tokens: Any, web_html: Read
) -> None:
    secure = TestClient(app, base_url="https://testserver")
    page = secure.get("/sign-in")
    assert "secure" in set_cookies(page)["agora_csrf"]
    fields = {
        i.attrs["name"]: i.attrs["value"]
        for i in web_html(page.text).find(id="sign-in").find_all("input", type="hidden")
    }
    response = post_sign_in(secure, fields, tokens.alice)
    assert response.status_code == 303, response.text
    cookie = set_cookies(response)["agora_session"]
    assert (cookie["secure"], cookie["httponly"], cookie["samesite"]) == ("true", "true", "strict")
    assert signed_in_as(secure, web_html) == "alice"


def test_an_unknown_or_revoked_token_shows_the_form_again_with_a_401(
    app: FastAPI, client: TestClient, tokens: Any, web_html: Read
) -> None:
    for secret in ("agora_not-a-token", "", " " * 3, "x" * 5000):
        fields = sign_in_form(client, web_html, "/experts")
        response = post_sign_in(client, fields, secret)
        assert response.status_code == 401, response.text
        page = web_html(response.text)
        assert "unknown or has been revoked" in page.find(id="sign-in-error").text
        # The form again, ready for another try, still going to the same place.
        again = page.find(id="sign-in").find("input", name="next")
        assert again.attrs["value"] == "/experts"
        assert "agora_session" not in set_cookies(response)
    assert session_rows(app) == []
    assert signed_in_as(client, web_html) is None


@pytest.mark.parametrize("tamper", ["missing_field", "other_value", "no_cookie"])
def test_a_sign_in_without_its_login_csrf_pair_is_refused(
    app: FastAPI, client: TestClient, tokens: Any, web_html: Read, tamper: str
) -> None:
    fields = sign_in_form(client, web_html)
    if tamper == "missing_field":
        del fields["csrf_token"]
    elif tamper == "other_value":
        fields["csrf_token"] = "a" * 43
    else:
        client.cookies.delete("agora_csrf")
    response = post_sign_in(client, fields, tokens.moderator)
    assert response.status_code == 403, response.text
    assert web_html(response.text).find(id="error-code").text == "csrf_failed"
    assert "agora_session" not in set_cookies(response)
    assert session_rows(app) == []


@pytest.mark.parametrize(
    "next_path",
    [
        "//evil.example/x",
        "https://evil.example/",
        "/\\evil.example",
        "\\\\evil.example",
        "/\t/evil.example",
        "javascript:alert(1)",
        "evil.example",
        "/sign-in?next=//evil.example",
    ],
)
def test_next_never_leads_off_the_site(
    client: TestClient, tokens: Any, web_html: Read, next_path: str
) -> None:
    fields = sign_in_form(client, web_html, next_path)
    assert fields["next"] == "/"
    # Posted as is, bypassing the form's own value: still home.
    response = post_sign_in(client, {**fields, "next": next_path}, tokens.alice)
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/"


def test_a_local_next_is_kept_with_its_query(
    client: TestClient, tokens: Any, web_html: Read
) -> None:
    fields = sign_in_form(client, web_html, "/experts?q=law&sort=name")
    assert fields["next"] == "/experts?q=law&sort=name"
    response = post_sign_in(client, fields, tokens.alice)
    assert response.headers["location"] == "/experts?q=law&sort=name"


def test_a_token_pasted_with_spaces_or_its_bearer_scheme_signs_in(
    client: TestClient, tokens: Any, web_html: Read
) -> None:
    for pasted in (f"  {tokens.alice}\n", f"Bearer {tokens.alice}"):
        client.cookies.clear()
        response = post_sign_in(client, sign_in_form(client, web_html), pasted)
        assert response.status_code == 303, response.text
        assert signed_in_as(client, web_html) == "alice"


def test_sign_out_ends_the_session_on_the_server(
    app: FastAPI, client: TestClient, tokens: Any, web_html: Read
) -> None:
    response = post_sign_in(client, sign_in_form(client, web_html), tokens.moderator)
    old_cookie = set_cookies(response)["agora_session"]["value"]
    assert signed_in_as(client, web_html) == "moderator"

    # Without the session's CSRF token: refused, still signed in.
    refused = client.post("/sign-out", follow_redirects=False)
    assert refused.status_code == 403
    assert web_html(refused.text).find(id="error-code").text == "csrf_failed"
    refused = client.post("/sign-out", data={"csrf_token": "forged"}, follow_redirects=False)
    assert refused.status_code == 403
    assert signed_in_as(client, web_html) == "moderator"

    out = client.post(
        "/sign-out", data={"csrf_token": session_csrf(client, web_html)}, follow_redirects=False
    )
    assert (out.status_code, out.headers["location"]) == (303, "/")
    assert set_cookies(out)["agora_session"]["max-age"] == "0"
    assert session_rows(app) == []
    # The old cookie, replayed, signs in no one.
    client.cookies.set("agora_session", old_cookie)
    assert signed_in_as(client, web_html) is None
    gone = client.get("/moderation", follow_redirects=False)
    assert (gone.status_code, gone.headers["location"]) == (303, "/sign-in?next=/moderation")


def test_sign_out_without_a_session_just_clears_the_cookie(
    client: TestClient, web_html: Read
) -> None:
    client.cookies.set("agora_session", "made-up")
    out = client.post("/sign-out", follow_redirects=False)
    assert (out.status_code, out.headers["location"]) == (303, "/")
    assert set_cookies(out)["agora_session"]["max-age"] == "0"


def test_signing_in_again_replaces_the_previous_session(
    app: FastAPI, client: TestClient, tokens: Any, web_html: Read
) -> None:
    post_sign_in(client, sign_in_form(client, web_html), tokens.alice)
    assert signed_in_as(client, web_html) == "alice"
    post_sign_in(client, sign_in_form(client, web_html), tokens.bob)
    assert signed_in_as(client, web_html) == "bob"
    assert len(session_rows(app)) == 1


def test_a_revoked_token_ends_its_web_sessions_at_once(
    app: FastAPI, client: TestClient, tokens: Any, web_html: Read
) -> None:
    post_sign_in(client, sign_in_form(client, web_html), tokens.alice)
    assert signed_in_as(client, web_html) == "alice"
    admin = {"Authorization": f"Bearer {tokens.admin}"}
    listed = client.get("/v1/tokens", headers=admin).json()["items"]
    (alice,) = [t for t in listed if t["name"] == "alice"]
    assert client.delete(f"/v1/tokens/{alice['id']}", headers=admin).status_code == 200
    assert signed_in_as(client, web_html) is None
    with app.state.runtime.sessions() as session:
        assert session.scalar(select(func.count()).select_from(WebSession)) == 1
    # Nor can the revoked token sign in again.
    again = post_sign_in(client, sign_in_form(client, web_html), tokens.alice)
    assert again.status_code == 401
