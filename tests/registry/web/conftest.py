"""Fixtures for the page tests (TestClient, both database backends): signing a browser in
through the real sign-in form, and reading a page's parts."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from html.parser import HTMLParser

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from registry.web.sessions import SESSION_COOKIE, Viewer
from registry.web.sessions import sign_in as start_session


@pytest.fixture
def web_sign_in(client: TestClient) -> Callable[[str], str]:
    """Sign ``client`` in with an API token through ``/sign-in`` (any earlier session's
    cookies dropped first); returns the session's CSRF secret, as its forms carry it."""

    def sign_in(token: str) -> str:
        client.cookies.clear()
        assert client.get("/sign-in").status_code == 200
        pre = client.cookies.get("agora_csrf")
        answer = client.post(
            "/sign-in",
            data={"token": token, "csrf_token": pre or "", "next": "/experts"},
            follow_redirects=False,
        )
        assert answer.status_code == 303, answer.text
        page = client.get("/experts")
        found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert found is not None, "a signed-in page carries the session's CSRF secret"
        return found.group(1)

    return sign_in


# -- reading a page (the sign-in and moderation page tests) ----------------------------------


class WebNode:
    """An element of a page read with the standard library's parser: its tag, attributes,
    children; ``find_all`` by tag and attribute values (``class_`` matches one class)."""

    VOID = frozenset(
        {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source"}
        | {"track", "wbr"}
    )

    def __init__(self, tag: str, attrs: dict[str, str]) -> None:
        self.tag, self.attrs = tag, attrs
        self.children: list[WebNode | str] = []

    @property
    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text for c in self.children)

    def walk(self) -> Iterator[WebNode]:
        for child in self.children:
            if isinstance(child, WebNode):
                yield child
                yield from child.walk()

    def _matches(self, tag: str | None, attrs: dict[str, str | None]) -> bool:
        for key, value in attrs.items():
            name = key.rstrip("_")
            if name not in self.attrs:
                return False
            have = self.attrs[name].split() if name == "class" else [self.attrs[name]]
            if value is not None and value not in have:
                return False
        return tag is None or self.tag == tag

    def find_all(self, tag: str | None = None, **attrs: str | None) -> list[WebNode]:
        return [n for n in self.walk() if n._matches(tag, attrs)]

    def find(self, tag: str | None = None, **attrs: str | None) -> WebNode:
        found = self.find_all(tag, **attrs)
        assert found, f"no <{tag or '*'} {attrs}> on the page"
        return found[0]

    def has(self, tag: str | None = None, **attrs: str | None) -> bool:
        return bool(self.find_all(tag, **attrs))


class _WebReader(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack = [WebNode("document", {})]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = WebNode(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in WebNode.VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def _read_page(html: str) -> WebNode:
    reader = _WebReader()
    reader.feed(html)
    reader.close()
    return reader.stack[0]


@pytest.fixture
def web_html() -> Callable[[str], WebNode]:
    """``web_html(response.text)``: the page as a tree of ``WebNode``s."""
    return _read_page


@pytest.fixture
def web_viewer(app: FastAPI, client: TestClient) -> Callable[[str], Viewer]:
    """``web_viewer(token)``: a web session for that API token made directly
    (registry.web.sessions.sign_in), its cookie set on ``client`` in place of any other;
    returns the viewer (``.csrf`` is what its forms carry). For the pages other than
    sign-in itself (the home and composition page tests)."""

    def open_session(token: str) -> Viewer:
        with app.state.runtime.sessions() as session, session.begin():
            session_id, viewer = start_session(session=session, secret=token, hours=1)
        client.cookies.clear()
        client.cookies.set(SESSION_COOKIE, session_id)
        return viewer

    return open_session
