"""Placeholders a datasheet's author has still to fill in (``FILL IN: ...``): refused
anywhere in the front matter, each one listed by path with what to write, once
everything else passes; and a last value written as a YAML block keeps its line break."""

from __future__ import annotations

import pytest
from helpers.artifacts import make_datasheet

from registry.errors import ValidationFailed
from registry.validation import parse_datasheet
from registry.validation.datasheet import UNFILLED_MARKER


def refused(data: bytes) -> ValidationFailed:
    with pytest.raises(ValidationFailed) as info:
        parse_datasheet(data)
    assert info.value.status == 422
    return info.value


def test_every_placeholder_is_listed_with_its_path_and_instruction() -> None:
    err = refused(
        make_datasheet(
            contact=f"{UNFILLED_MARKER} an e-mail address",
            intended_uses=["Language modelling", f"  {UNFILLED_MARKER} what else it is for"],
            **{"x-review": {"by": f"{UNFILLED_MARKER}"}},
        )
    )
    assert err.code == "datasheet_unfilled"
    assert err.errors == [
        {
            "path": "$.intended_uses[1]",
            "message": "not filled in: what else it is for (replace the whole value, "
            "'FILL IN:' included)",
        },
        {
            "path": "$.contact",
            "message": "not filled in: an e-mail address (replace the whole value, "
            "'FILL IN:' included)",
        },
        {
            "path": "$.x-review.by",
            "message": "not filled in: write this field (replace the whole value, "
            "'FILL IN:' included)",
        },
    ]
    assert "$.intended_uses[1], $.contact, $.x-review.by" in err.detail


def test_the_marker_counts_only_at_the_start_of_a_value() -> None:
    sheet = parse_datasheet(
        make_datasheet(domain="Forms whose blanks say FILL IN: name, date", samples=["fill in: x"])
    )
    assert sheet.domain.startswith("Forms")


def test_schema_problems_come_before_placeholders() -> None:
    err = refused(make_datasheet(contact=f"{UNFILLED_MARKER} who", license="not a license"))
    assert err.code == "datasheet_invalid"
    assert [e["path"] for e in err.errors or []] == ["$.license"]


def test_a_last_block_value_keeps_its_final_line_break() -> None:
    data = make_datasheet(samples=None)
    text = data.decode().replace("---\n\n#", "samples:\n- |\n  line one\n  line two\n---\n\n#", 1)
    assert parse_datasheet(text.encode()).samples == ("line one\nline two\n",)
