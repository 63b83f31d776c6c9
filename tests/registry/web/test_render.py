"""How pages are made: markdown a datasheet's author writes is shown, never run; a failure
is an error page."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from registry.web.render import markdown


def test_raw_html_in_markdown_is_shown_as_text() -> None:
    html = markdown("Hello <script>alert(1)</script> and <img src=x onerror=alert(2)>")
    assert "<script" not in html
    assert "<img" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_script_urls_are_not_links_and_web_urls_are() -> None:
    assert "<a" not in markdown("[click](javascript:alert(1)) [x](vbscript:msgbox)")
    assert '<a href="https://example.org/a">site</a>' in markdown("[site](https://example.org/a)")


def test_html_comments_are_dropped_without_making_markup() -> None:
    html = markdown("kept <!-- a prompt\nfor the author --> too <scr<!-- -->ipt>x</script>")
    assert "prompt" not in html
    assert "kept" in html
    assert "too" in html
    assert "<script" not in html
    # An unclosed comment hides the rest, as a browser would.
    assert "secret" not in markdown("shown <!-- secret")


def _broken(exc: Exception) -> Callable[..., Any]:
    def counts(**_: Any) -> Any:
        raise exc

    return counts


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (RuntimeError("a bug"), 500, "internal_error"),
        (
            OperationalError("SELECT 1", {}, Exception("connection lost")),
            503,
            "database_unavailable",
        ),
    ],
)
def test_an_unexpected_failure_is_an_error_page_with_the_page_headers(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, exc: Exception, status: int, code: str
) -> None:
    """A page that fails for a reason of the server's own is still a page: the status the
    API would give (registry/api/problems.py), its code, and the pages' security headers."""
    from registry.services import stats

    monkeypatch.setattr(stats, "registry_counts", _broken(exc))
    answer = client.get("/")
    assert answer.status_code == status
    assert answer.headers["content-type"].startswith("text/html")
    assert f'<code id="error-code">{code}</code>' in answer.text
    assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
    if status == 503:
        assert answer.headers["retry-after"] == "2"
