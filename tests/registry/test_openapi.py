"""The OpenAPI document tells the truth (registry/api/openapi.py), OPTIONS and 405 name the
right methods, and the numbers docs/registry.md and docs/validation.md quote are the code's.

That every status a route answers is documented is tests/adversarial/test_schemathesis.py's.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from registry.settings import Settings
from registry.validation import (
    DEFAULT_MAX_DATASHEET_BYTES,
    DEFAULT_MAX_EXPERT_BYTES,
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_MAX_SAMPLES_BYTES,
)
from registry.validation.safetensors_format import DEFAULT_CHUNK_BYTES

ROOT = Path(__file__).resolve().parents[2]
HTTP_METHODS = {"get", "head", "post", "put", "patch", "delete", "options", "trace"}


def _operations(document: dict[str, Any]):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield path, method, operation


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x1", path)


def test_every_problem_is_documented_as_problem_json(client) -> None:
    document = client.get("/openapi.json").json()
    problem = document["components"]["schemas"]["Problem"]
    assert set(problem["required"]) == {"type", "title", "status", "detail", "code"}
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for path, method, operation in _operations(document):
        statuses = {int(s) for s in operation["responses"]}
        where = f"{method.upper()} {path}"
        # Every operation: a NUL anywhere (400), a failing credential (401), the database.
        assert {400, 401, 503} <= statuses, where
        for status, response in operation["responses"].items():
            if int(status) >= 400:
                assert response["content"] == {
                    "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
                }, (where, status)
        security = operation["security"]
        if {} in security:
            assert 403 not in statuses or path == "/v1/experts", where
        else:
            assert {401, 403} <= statuses, where


def test_validation_422_is_documented_only_where_artifacts_are_validated(client) -> None:
    document = client.get("/openapi.json").json()
    with_422 = {
        (method.upper(), path)
        for path, method, operation in _operations(document)
        if "422" in operation["responses"]
    }
    assert with_422 == {
        ("POST", "/v1/base-models"),
        ("POST", "/v1/experts"),
        ("POST", "/v1/compositions"),
        ("POST", "/v1/jobs/{job_id}/complete"),
    }


def test_the_document_uses_json_schema_keywords_only(client) -> None:
    """pydantic writes constraints it cannot place as "ge"/"le": nothing reads those."""
    text = client.get("/openapi.json").text
    for keyword in ('"ge"', '"le"', '"gt"', '"lt"', '"min_length"', '"max_length"'):
        assert keyword not in text, keyword


def test_content_types_are_the_served_ones(api) -> None:
    document = api.client.get("/openapi.json").json()
    paths = document["paths"]
    datasheet = paths["/v1/experts/{expert_id}/datasheet"]["get"]["responses"]["200"]
    assert list(datasheet["content"]) == ["text/markdown"]
    weights = paths["/v1/experts/{expert_id}/weights"]["get"]["responses"]
    assert list(weights["200"]["content"]) == ["application/octet-stream"]
    assert {"200", "206", "416"} <= set(weights)
    assert "Content-Range" in weights["206"]["headers"]
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]

    expert = api.submit().json()["id"]
    served = api.client.get(f"/v1/experts/{expert}/datasheet")
    assert served.headers["content-type"] == "text/markdown; charset=utf-8"
    ranged = api.client.get(f"/v1/experts/{expert}/weights", headers={"Range": "bytes=0-9"})
    assert ranged.status_code == 206
    assert ranged.headers["content-type"] == "application/octet-stream"


def test_options_names_the_methods_of_every_documented_path(client) -> None:
    document = client.get("/openapi.json").json()
    assert len(document["paths"]) >= 20
    for path, item in document["paths"].items():
        documented = {m.upper() for m in item if m in HTTP_METHODS}
        response = client.options(_concrete(path))
        assert response.status_code == 204, (path, response.text)
        assert set(response.headers["allow"].split(", ")) == documented | {"OPTIONS"}, path
    weights = client.options("/v1/experts/ex_1/weights")
    assert weights.headers["allow"] == "GET, HEAD, OPTIONS"
    # A literal path and a template that also matches it: the literal one's methods.
    assert client.options("/v1/jobs/lease").headers["allow"] == "OPTIONS, POST"
    assert client.options("/v1/jobs/job_1").headers["allow"] == "GET, OPTIONS"
    for anonymous in ("/openapi.json", "/docs", "/healthz"):
        assert client.options(anonymous).headers["allow"] == "GET, OPTIONS"


def test_options_on_a_missing_path_stays_404(client) -> None:
    for path in ("/nope", "/v1/experts/a/b/c", "/v1"):
        response = client.options(path)
        assert response.status_code == 404, path
        assert response.json()["code"] == "not_found"


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("DELETE", "/v1/experts", "GET, OPTIONS, POST"),
        ("PUT", "/v1/experts/ex_1/weights", "GET, HEAD, OPTIONS"),
        ("POST", "/v1/experts/ex_1/weights", "GET, HEAD, OPTIONS"),
        ("PATCH", "/v1/jobs/lease", "OPTIONS, POST"),
        ("HEAD", "/v1/experts", "GET, OPTIONS, POST"),
    ],
)
def test_a_method_a_path_lacks_is_405_with_every_method_it_has(client, method, path, allow):
    response = client.request(method, path)
    assert response.status_code == 405
    assert response.headers["allow"] == allow
    assert response.headers["content-type"] == "application/problem+json"


# -- the numbers the docs quote ---------------------------------------------------------------

_UNITS = {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def _size(text: str) -> int:
    number, unit = text.split()
    return int(number) * _UNITS[unit]


def test_docs_registry_settings_table_matches_the_defaults() -> None:
    """Every size and duration in docs/registry.md's settings table is Settings'."""
    fields = Settings.model_fields
    # Defaults derived from others (no environment read: model_construct).
    derived = {"max_json_body_bytes": Settings.model_construct().json_body_limit}
    table = (ROOT / "docs/registry.md").read_text()
    rows = re.findall(r"^\| `(AGORA_[A-Z_]+)`[^|]*\| ([^|]+) \|", table, flags=re.M)
    checked = 0
    for variable, default in rows:
        name = variable.removeprefix("AGORA_").lower()
        if name not in fields:
            continue
        value = derived.get(name, fields[name].default)
        cell = default.strip()
        if re.fullmatch(r"\d+ [KMG]iB", cell):
            assert value == _size(cell), variable
        elif re.fullmatch(r"[\d.]+", cell):
            assert value == float(cell), variable
        else:
            continue
        checked += 1
    assert checked >= 6, rows
    # The three base-file caps share one row.
    row = re.search(r"`AGORA_MAX_BASE_CONFIG_BYTES`.*\| ([^|]+) \|", table)
    assert row is not None
    config, tokenizer, weights = (_size(v.strip()) for v in row.group(1).split("/"))
    assert (config, tokenizer, weights) == (
        fields["max_base_config_bytes"].default,
        fields["max_base_tokenizer_bytes"].default,
        fields["max_base_weights_bytes"].default,
    )


def test_docs_validation_quotes_the_real_caps() -> None:
    text = (ROOT / "docs/validation.md").read_text()
    served_datasheet = Settings.model_fields["max_datasheet_bytes"].default
    served_expert = Settings.model_fields["max_expert_bytes"].default
    assert f"{served_datasheet // 1024} KiB" in text
    assert f"{served_expert // 1024**3} GiB" in text
    assert f"{DEFAULT_MAX_DATASHEET_BYTES // 1024**2} MiB" in text
    assert f"{DEFAULT_MAX_EXPERT_BYTES // 1024**3} GiB" in text
    # No cap is quoted that no code has (the speed section quotes measurements).
    rules = text.split("### Speed")[0]
    quoted = {_size(m) for m in re.findall(r"\b\d+ [KMG]iB\b", rules)}
    known = {
        served_datasheet,
        served_expert,
        DEFAULT_MAX_DATASHEET_BYTES,
        DEFAULT_MAX_EXPERT_BYTES,
        DEFAULT_MAX_HEADER_BYTES,
        DEFAULT_CHUNK_BYTES,
        DEFAULT_MAX_SAMPLES_BYTES,
    }
    assert quoted <= known, quoted - known
