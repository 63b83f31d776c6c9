"""The pages' markdown: what a datasheet's author writes is shown, never run."""

from __future__ import annotations

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
