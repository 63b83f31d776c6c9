"""Headless Chromium for the browser tests of the web pages (docs/web.md).

Debian's ``chromium`` package, driven by Playwright's Python package pointed at that
executable: never ``playwright install``, which would download a browser of its own. When
``chromium`` is not on PATH the tests fail (``make browser`` installs Debian's package);
they never skip.

A ``Visitor`` is one browser context (its own cookies) on one registry, 1280x800: it
records every request its pages make and every page (document) response, so a test can
assert that nothing came from another origin and that every page carried the security
headers (``check``). Usage::

    with launch_chromium() as browser:
        visitor = Visitor.open(browser, registry.url)
        visitor.sign_in(token)
        visitor.page.goto(registry.url + "/experts")
        visitor.screenshot("experts")
        visitor.check()
        visitor.close()
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Page,
    Request,
    Response,
    ViewportSize,
    sync_playwright,
)

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "docs" / "screenshots"
VIEWPORT: ViewportSize = {"width": 1280, "height": 800}
# No sandbox (tests may run as root in a container), no GPU, and nothing the browser would
# fetch on its own (component updates, sync, QUIC probes): the pages' requests are the only
# ones, so "nothing from another origin" is about the pages.
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
)
# Playwright's own timeouts, in milliseconds: pages are local, so a few seconds is plenty
# for anything but a worker's job (which tests wait for explicitly).
ACTION_TIMEOUT_MS = 15_000


def chromium_path() -> str:
    """Debian's Chromium on PATH; a failure (never a skip) without it."""
    path = shutil.which("chromium")
    if path is None:
        pytest.fail(
            "the browser tests need Debian's chromium on PATH: `make browser` installs it "
            "(apt-get install chromium); Playwright's own browser download is never used",
            pytrace=False,
        )
    return path


@contextmanager
def launch_chromium() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path(), headless=True, args=list(CHROMIUM_ARGS)
        )
        try:
            yield browser
        finally:
            browser.close()


def header_problems(url: str, headers: dict[str, str]) -> list[str]:
    """What a page response lacks of the security headers the issue asks for."""
    problems: list[str] = []
    csp = headers.get("content-security-policy", "")
    if not csp:
        problems.append(f"{url}: no Content-Security-Policy")
    if "unsafe-inline" in csp or "unsafe-eval" in csp:
        problems.append(f"{url}: the Content-Security-Policy allows unsafe code: {csp}")
    if "frame-ancestors 'none'" not in csp:
        problems.append(f"{url}: the Content-Security-Policy lacks frame-ancestors 'none'")
    if headers.get("x-content-type-options", "").lower() != "nosniff":
        problems.append(f"{url}: X-Content-Type-Options is not nosniff")
    return problems


@dataclass
class Visitor:
    """One browser context on one registry, with what its pages requested."""

    base_url: str
    context: BrowserContext
    page: Page
    requests: list[str] = field(default_factory=list)
    documents: list[Response] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, browser: Browser, base_url: str, *, javascript: bool = True) -> Visitor:
        context = browser.new_context(
            viewport=VIEWPORT, base_url=base_url, java_script_enabled=javascript
        )
        context.set_default_timeout(ACTION_TIMEOUT_MS)
        visitor = cls(base_url=base_url, context=context, page=context.new_page())
        context.on("request", visitor._on_request)
        context.on("response", visitor._on_response)
        visitor.page.on("pageerror", lambda exc: visitor.page_errors.append(str(exc)))
        return visitor

    def _on_request(self, request: Request) -> None:
        self.requests.append(request.url)

    def _on_response(self, response: Response) -> None:
        if response.request.resource_type == "document":
            self.documents.append(response)

    def url(self, path: str) -> str:
        return self.base_url + path

    def goto(self, path: str) -> Response:
        response = self.page.goto(self.url(path))
        assert response is not None, path
        return response

    def sign_in(self, token: str, next_path: str = "/") -> None:
        """Through the sign-in form, as a person does: paste the token, submit."""
        self.goto(f"/sign-in?next={quote(next_path)}")
        form = self.page.locator("form#sign-in")
        form.locator("input[name=token]").fill(token)
        form.locator("button, input[type=submit]").first.click()
        self.page.wait_for_url(self.url(next_path))
        signed_in = self.page.locator("#signed-in-as")
        assert signed_in.count() == 1, f"not signed in after the form: {self.page.content()}"

    def screenshot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def foreign_requests(self) -> list[str]:
        """Requests to anywhere but the registry (data: URLs are not requests elsewhere)."""
        home = urlsplit(self.base_url).netloc
        return [
            u for u in self.requests if not u.startswith("data:") and urlsplit(u).netloc != home
        ]

    def check(self) -> None:
        """No page was a server error, nothing came from another origin, and every page
        carried the security headers."""
        failed = [f"{r.status} {r.url}" for r in self.documents if r.status >= 500]
        assert failed == [], f"server errors: {failed}"
        assert self.foreign_requests() == [], self.foreign_requests()
        problems = [
            p
            for response in self.documents
            if urlsplit(response.url).path.rstrip("/") not in ("/docs", "/redoc")
            for p in header_problems(response.url, response.all_headers())
        ]
        assert problems == [], problems

    def close(self) -> None:
        self.context.close()
