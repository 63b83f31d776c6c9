"""Datasheets: YAML front matter checked against the JSON schema, every problem listed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.artifacts import datasheet_front_matter, make_datasheet

from registry.errors import PayloadTooLarge, ValidationFailed
from registry.validation import Datasheet, datasheet_schema, parse_datasheet

REPO = Path(__file__).resolve().parents[3]
REQUIRED = datasheet_schema()["required"]


def refused(data: bytes, **kwargs: int) -> ValidationFailed:
    with pytest.raises(ValidationFailed) as info:
        parse_datasheet(data, **kwargs)
    assert info.value.status == 422
    return info.value


def paths(err: ValidationFailed) -> list[str]:
    return [e["path"] for e in err.errors or []]


def test_the_shipped_example_is_valid() -> None:
    sheet = parse_datasheet((REPO / "examples" / "datasheet.md").read_bytes())
    assert isinstance(sheet, Datasheet)
    assert sheet.license == "CC-BY-4.0"
    assert sheet.language == ("en",)
    assert len(sheet.samples) >= 3
    assert sheet.body.lstrip().startswith("# Tide-pool ecology field notes")


def test_typed_fields() -> None:
    data = make_datasheet(
        language="pt-BR",
        intended_uses="Modelling Brazilian legal text",
        sources=["Diário Oficial", {"name": "Court rulings", "url": "https://example.org/r"}],
        parents=[{"expert_id": "ex_01HZX0ABCDEF", "version": 2, "weight": 0.25}],
        token_count=5.0,  # JSON Schema's integer: typed as int
        **{"x-training": {"steps": 100}},
    )
    sheet = parse_datasheet(data)
    assert sheet.language == ("pt-BR",)
    assert sheet.intended_uses == ("Modelling Brazilian legal text",)
    assert [s.name for s in sheet.sources] == ["Diário Oficial", "Court rulings"]
    assert sheet.sources[1].url == "https://example.org/r"
    assert sheet.parents[0].expert_id == "ex_01HZX0ABCDEF"
    assert (sheet.parents[0].version, sheet.parents[0].weight) == (2, 0.25)
    assert sheet.token_count == 5
    assert isinstance(sheet.token_count, int)
    assert sheet.extensions == {"x-training": {"steps": 100}}
    assert sheet.front_matter["name"] == sheet.name


@pytest.mark.parametrize("data", [None, b""])
def test_datasheet_missing(data: bytes | None) -> None:
    assert refused(data).code == "datasheet_missing"  # type: ignore[arg-type]


def test_datasheet_too_large() -> None:
    data = make_datasheet()
    parse_datasheet(data, max_bytes=len(data))
    with pytest.raises(PayloadTooLarge) as info:
        parse_datasheet(data, max_bytes=len(data) - 1)
    assert (info.value.code, info.value.status) == ("datasheet_too_large", 413)


@pytest.mark.parametrize(
    "data",
    [
        b"# Just markdown\n\nNo front matter here.\n",
        b"name: x\n---\n",  # YAML but no opening fence
        b"---\nname: x\n",  # never closed
        b"---\nname: [unclosed\n---\n",  # YAML syntax error
        b"---\n- a\n- list\n---\n",  # not a mapping
        b"---\n---\n",  # empty front matter
        b"---\njust a string\n---\n",
        b"---\nname: \xff\n---\n",  # not UTF-8
        b"---\nname: a\nname: b\n---\n",  # duplicate key
        b"---\na: &x [1]\nb: *x\n---\n",  # aliases
    ],
)
def test_datasheet_front_matter(data: bytes) -> None:
    assert refused(data).code == "datasheet_front_matter"


def test_alias_bomb_is_refused_quickly() -> None:
    lines = ["---", 'l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        prev = ",".join([f"*l{i - 1}"] * 9)
        lines.append(f"l{i}: &l{i} [{prev}]")
    err = refused(("\n".join(lines) + "\n---\n").encode())
    assert err.code == "datasheet_front_matter"
    assert "alias" in err.detail


def test_yaml_error_names_the_line() -> None:
    err = refused(b"---\nname: ok\nlicense: [MIT\n---\n")
    assert "line" in err.detail


def test_crlf_and_bom_are_accepted() -> None:
    data = "\ufeff".encode() + make_datasheet().replace(b"\n", b"\r\n")
    assert parse_datasheet(data).name == datasheet_front_matter()["name"]


@pytest.mark.parametrize("key", REQUIRED)
def test_each_required_key(key: str) -> None:
    err = refused(make_datasheet(**{key: None}))
    assert err.code == "datasheet_invalid"
    assert paths(err) == [f"$.{key}"]


@pytest.mark.parametrize(
    ("overrides", "path"),
    [
        ({"name": ""}, "$.name"),
        ({"name": "   "}, "$.name"),
        ({"name": 42}, "$.name"),
        ({"domain": "x" * 10_001}, "$.domain"),
        ({"license": "MIT license"}, "$.license"),
        ({"license": ["MIT"]}, "$.license"),
        ({"language": "english!"}, "$.language"),
        ({"language": []}, "$.language"),
        ({"language": ["en", "e"]}, "$.language[1]"),
        ({"language": ["en", "en"]}, "$.language"),
        ({"sources": []}, "$.sources"),
        ({"sources": [{"url": "https://x.org"}]}, "$.sources[0].name"),
        ({"sources": [{"name": "a", "homepage": "x"}]}, "$.sources[0].homepage"),
        ({"sources": [{"name": "a", "url": "javascript:alert(1)"}]}, "$.sources[0].url"),
        ({"token_count": -1}, "$.token_count"),
        ({"token_count": "1M"}, "$.token_count"),
        ({"token_count": 1.5}, "$.token_count"),
        ({"token_count": True}, "$.token_count"),
        ({"pii_handling": ""}, "$.pii_handling"),
        ({"intended_uses": []}, "$.intended_uses"),
        ({"out_of_scope_uses": [""]}, "$.out_of_scope_uses[0]"),
        ({"contact": ""}, "$.contact"),
        ({"samples": []}, "$.samples"),
        ({"samples": "one passage"}, "$.samples"),
        ({"samples": ["ok", ""]}, "$.samples[1]"),
        ({"samples": ["ok", " \n "]}, "$.samples[1]"),
        ({"samples": ["ok", 3]}, "$.samples[1]"),
        ({"parents": [{"expert_id": "ex_A"}]}, "$.parents[0].version"),
        ({"parents": [{"expert_id": "model-a", "version": 1}]}, "$.parents[0].expert_id"),
        ({"parents": [{"expert_id": "ex_A", "version": 0}]}, "$.parents[0].version"),
        ({"tags": ["has space"]}, "$.tags[0]"),
        ({"homepage": "https://x.org"}, "$.homepage"),
        ({"x-when": float("nan")}, "$.x-when"),
    ],
)
def test_datasheet_invalid_names_the_path(overrides: dict, path: str) -> None:
    err = refused(make_datasheet(**overrides))
    assert err.code == "datasheet_invalid"
    assert paths(err) == [path]


def test_every_problem_is_listed_at_once() -> None:
    err = refused(make_datasheet(license="??", token_count=-5, contact=None, samples=[""]))
    assert paths(err) == ["$.contact", "$.license", "$.samples[0]", "$.token_count"]


@pytest.mark.parametrize(
    "front_matter",
    [
        "1: numeric key",  # YAML keys need not be strings; JSON's must
        "x-blob: !!binary aGVsbG8=",
        "x-set: !!set {a, b}",
    ],
)
def test_non_json_yaml_values_are_refused(front_matter: str) -> None:
    data = make_datasheet().replace(b"---\n", f"---\n{front_matter}\n".encode(), 1)
    assert refused(data).code == "datasheet_invalid"


def test_dates_stay_strings() -> None:
    data = make_datasheet().replace(b"---\n", b"---\nx-collected: 2024-05-01\n", 1)
    assert parse_datasheet(data).extensions == {"x-collected": "2024-05-01"}


def test_samples_size_cap_counts_utf8_bytes() -> None:
    three_bytes = "語" * 1000  # 3000 bytes of UTF-8
    at_limit = make_datasheet(samples=[three_bytes, three_bytes])
    assert parse_datasheet(at_limit, max_samples_bytes=6000).samples_bytes == 6000
    err = refused(at_limit, max_samples_bytes=5999)
    assert err.code == "samples_too_large"
    assert paths(err) == ["$.samples"]


def test_default_samples_cap_is_64_kib() -> None:
    big = ["a" * 1024] * 64
    assert parse_datasheet(make_datasheet(samples=big)).samples_bytes == 64 * 1024
    assert refused(make_datasheet(samples=[*big, "b"])).code == "samples_too_large"


def test_error_messages_stay_short_for_huge_values() -> None:
    err = refused(make_datasheet(license="x " * 5000))
    assert all(len(e["message"]) <= 300 for e in err.errors or [])


def test_every_error_code_is_documented() -> None:
    from registry.validation import TOO_LARGE_CODES, ErrorCode

    doc = (REPO / "docs" / "validation.md").read_text()
    for code in ErrorCode:
        status = "413" if code in TOO_LARGE_CODES else "422"
        assert f"| `{code.value}` | {status} |" in doc, code


# -- hostile front matter: refused by validation, with the path of the field ----------------

NAME = b"name: Tide-pool ecology notes"


def _with(old: bytes, new: bytes) -> bytes:
    data = make_datasheet()
    assert data.count(old) == 1
    return data.replace(old, new)


@pytest.mark.parametrize(
    ("data", "code", "path"),
    [
        # Nesting: the scanner refuses a 33rd level of [ or { (a run of them cost it a
        # second), the composer a 33rd level of any kind, before recursing into it.
        (_with(NAME, b"name: " + b"[" * 250_000), "datasheet_front_matter", "$.name"),
        (_with(NAME, b"name: " + b"[" * 400 + b"]" * 400), "datasheet_front_matter", "$.name"),
        (
            _with(NAME, b"name: x\nx-n:\n" + b"".join(b"  " * i + b"-\n" for i in range(1, 60))),
            "datasheet_front_matter",
            "$.x-n" + "[0]" * 31,
        ),
        # Integers: a literal Python would refuse to convert, and one beyond 64 bits.
        (
            _with(b"token_count: 1250000", b"token_count: " + b"9" * 4301),
            "datasheet_front_matter",
            "$.token_count",
        ),
        (
            _with(b"token_count: 1250000", b"token_count: !!int '" + b"1" * 5000 + b"'"),
            "datasheet_front_matter",
            "$.token_count",
        ),
        (
            _with(b"token_count: 1250000", b"token_count: 0x" + b"f" * 17),
            "datasheet_invalid",
            "$.token_count",
        ),
        # Text no row can hold, from YAML escapes.
        (_with(NAME, b'name: "\\ud800"'), "datasheet_invalid", "$.name"),
        (_with(NAME, b'name: "a\\0b"'), "datasheet_invalid", "$.name"),
        (_with(NAME, b'name: x\nx-e: {"\\udc00": 1}'), "datasheet_invalid", "$.x-e['\\udc00']"),
        (make_datasheet(body="# Notes\n\nA NUL \x00 in the body.\n"), "datasheet_invalid", "body"),
        # Wider than the columns they are stored in.
        (_with(NAME, b"name: " + b"n" * 201), "datasheet_invalid", "$.name"),
        (
            make_datasheet(language=[f"en-x{i:02d}" for i in range(40)]),
            "datasheet_invalid",
            "$.language",
        ),
        (_with(NAME, b"name: &a x\nx-b: [*a]"), "datasheet_front_matter", "$.x-b[0]"),
    ],
)
def test_hostile_front_matter_names_the_field(data: bytes, code: str, path: str) -> None:
    err = refused(data)
    assert err.code == code
    assert paths(err)[0] == path
    # Error bodies quote what they refuse: they must be encodable themselves.
    json.dumps(err.problem(), ensure_ascii=False).encode("utf-8")


def test_nesting_and_names_within_the_limits_are_accepted() -> None:
    nested: object = "leaf"
    for _ in range(29):  # with the root and the key: 31 levels of the 32
        nested = [nested]
    sheet = parse_datasheet(make_datasheet(**{"x-nested": nested, "name": "n" * 200}))
    assert sheet.name == "n" * 200
    assert parse_datasheet(make_datasheet(name="\U0001f30a tide pools")).name.startswith(
        "\U0001f30a"
    )
