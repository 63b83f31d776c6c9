"""Regression tests for what a probe of the running registry broke (issue 14, defects 1-3),
through the app on SQLite and PostgreSQL: every case answers 4xx problem+json with its
code, and leaves no new blob, staging file or row behind.

1. Unauthenticated 500s: out-of-range version numbers and other integers a client sends;
   NUL in paths, query strings and form fields; lone surrogates, NUL, NaN and deep nesting
   in JSON bodies; bodies over the size cap (registry/api/hygiene.py).
2. Datasheets that crashed an upload: deep nesting, a 4,301-digit integer, aliases, a lone
   surrogate or NUL in name/domain/body, values wider than their column.
3. ``__metadata__.layers`` that disagrees with the tensors.

One app per backend serves the whole module (they are independent requests); each case
compares what the service holds before and after it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from helpers.artifacts import make_base_files, make_datasheet, make_expert_bytes
from helpers.databases import empty_tables
from sqlalchemy import func, select

from registry.api.deps import SessionDep
from registry.app import create_app
from registry.db.models import Base, Expert
from registry.settings import MiB, Settings

PROBLEM = "application/problem+json"
# Small enough that the size tests send little; a valid search still fits.
JSON_CAP = 128 * 1024


@dataclass
class Env:
    app: FastAPI
    client: TestClient
    admin: dict[str, str]
    alice: dict[str, str]
    worker: dict[str, str]
    revision: str
    schema: dict[str, Any]
    expert_id: str

    def state(self) -> dict[str, Any]:
        """Rows per table, blob files and staging files the service holds now."""
        runtime = self.app.state.runtime
        with runtime.sessions() as session:
            rows = {
                table.name: session.scalar(select(func.count()).select_from(table))
                for table in Base.metadata.sorted_tables
            }
        root = Path(runtime.store.location)
        blobs = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        return {"rows": rows, "blobs": blobs, "staging": sorted(map(str, runtime.staging.files()))}

    def expert(self, **overrides: Any) -> bytes:
        return make_expert_bytes(self.schema, base_revision=self.revision, **overrides)

    def submit(
        self, *, weights: bytes | None = None, datasheet: bytes | None = None, **fields: str
    ) -> httpx.Response:
        return self.client.post(
            "/v1/experts",
            files={
                "weights": ("e.safetensors", self.expert(seed=7) if weights is None else weights),
                "datasheet": ("DATASHEET.md", make_datasheet() if datasheet is None else datasheet),
            },
            data={"base_revision": self.revision, **fields},
            headers=self.alice,
        )


@pytest.fixture(scope="module")
def env(migrated_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    from registry.services.tokens import create_token

    empty_tables(migrated_database_url)
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("hygiene") / "agora",
        database_url=migrated_database_url,
        max_json_body_bytes=JSON_CAP,
        # Rate limits are registry/api/limits.py's tests; these send hundreds of requests.
        rate_limit_anonymous_per_second=0,
        rate_limit_token_per_second=0,
        rate_limit_search_per_second=0,
    )
    app = create_app(settings)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            runtime = app.state.runtime
            with runtime.sessions() as session, session.begin():
                secrets = {
                    role: create_token(session=session, name=role, role=role)[1]
                    for role in ("admin", "contributor", "worker")
                }
            admin, alice, worker = (
                {"Authorization": f"Bearer {secrets[r]}"}
                for r in ("admin", "contributor", "worker")
            )
            files = make_base_files()
            base = client.post(
                "/v1/base-models",
                files={
                    "config": ("config.json", files["config.json"]),
                    "tokenizer": ("tokenizer.json", files["tokenizer.json"]),
                    "weights": ("model.safetensors", files["model.safetensors"]),
                },
                headers=admin,
            )
            assert base.status_code == 201, base.text
            revision, schema = base.json()["revision"], base.json()["expert_schema"]
            weights = make_expert_bytes(schema, base_revision=revision)
            first = client.post(
                "/v1/experts",
                files={"weights": ("e", weights), "datasheet": ("d", make_datasheet())},
                data={"base_revision": revision},
                headers=alice,
            )
            assert first.status_code == 201, first.text
            yield Env(app, client, admin, alice, worker, revision, schema, first.json()["id"])
    finally:
        empty_tables(migrated_database_url)


def refused(
    env: Env, response: httpx.Response, before: dict[str, Any], status: int, code: str
) -> dict[str, Any]:
    """The response is the expected problem, and the service holds what it held before."""
    assert response.status_code == status, response.text
    if response.request.method != "HEAD":
        assert response.headers["content-type"].startswith(PROBLEM)
        body: dict[str, Any] = response.json()
        assert body["code"] == code, body
    else:
        body = {}
    assert env.state() == before
    return body


# -- 1a: integers bounded by the columns they reach ------------------------------------------

VERSIONS = [str(2**63), str(2**64), str(2**31), "0", "-1", "9" * 5000]


@pytest.mark.parametrize("route", ["weights", "datasheet"])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_out_of_range_versions_in_downloads(env: Env, route: str, method: str) -> None:
    before = env.state()
    for version in VERSIONS:
        response = env.client.request(
            method, f"/v1/experts/{env.expert_id}/{route}", params={"version": version}
        )
        if method == "HEAD" and route == "datasheet":
            assert response.status_code in (400, 405), version  # GET-only route
            continue
        refused(env, response, before, 400, "invalid_request")
    # The largest version a column holds is a plain miss, not an error.
    miss = env.client.get(f"/v1/experts/{env.expert_id}/weights", params={"version": 2**31 - 1})
    refused(env, miss, before, 404, "version_not_found")


@pytest.mark.parametrize("version", [2**63, 2**31, 0, -5])
def test_out_of_range_version_in_an_evaluation(env: Env, version: int) -> None:
    before = env.state()
    response = env.client.post(
        "/v1/evaluations",
        json={"expert_id": env.expert_id, "version": version, "text_sets": {"a": ["text"]}},
        headers=env.alice,
    )
    body = refused(env, response, before, 400, "invalid_request")
    assert body["errors"][0]["loc"] == ["body", "version"]


def test_out_of_range_fencing_tokens(env: Env) -> None:
    before = env.state()
    for route, payload in [
        ("heartbeat", {"fencing_token": 2**63}),
        ("fail", {"fencing_token": -(2**63) - 1, "error": "x"}),
    ]:
        response = env.client.post(f"/v1/jobs/job_x/{route}", json=payload, headers=env.worker)
        refused(env, response, before, 400, "invalid_request")
    for token in (2**64, "1" * 5000, 1.5e300):
        response = env.client.post(
            "/v1/jobs/job_x/complete",
            json={"fencing_token": token, "result": {}},
            headers=env.worker,
        )
        refused(env, response, before, 400, "invalid_fencing_token")


def test_a_range_header_of_thousands_of_digits_is_ignored(env: Env) -> None:
    for header in ("bytes=" + "9" * 5000 + "-", "bytes=-" + "9" * 5000):
        response = env.client.get(f"/v1/experts/{env.expert_id}/weights", headers={"Range": header})
        assert response.status_code == 200  # RFC 9110: an unusable Range is ignored


@pytest.mark.parametrize("after", ["\x00", "\ud800", "ex_' OR 1=1 --"])
def test_a_forged_cursor_is_refused(env: Env, after: str) -> None:
    import base64

    raw = json.dumps({"after": after}).encode()
    cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    before = env.state()
    response = env.client.get("/v1/experts", params={"cursor": cursor})
    refused(env, response, before, 400, "invalid_cursor")


# -- 1b: NUL in paths, query strings and form fields -----------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "/v1/experts/ex_%00x",
        "/v1/experts/ex_%00x/weights",
        "/v1/base-models/%00",
        "/v1/compositions/%00",
        "/v1/experts?q=a%00b",
        "/v1/experts?base_revision=a%00b",
        "/v1/experts?cursor=%00",
        "/v1/jobs?status=%00",
    ],
)
def test_nul_in_a_url(env: Env, url: str) -> None:
    before = env.state()
    response = env.client.get(url, headers=env.admin)
    body = refused(env, response, before, 400, "invalid_characters")
    assert body["errors"][0]["path"] == ("query" if "?" in url else "path")


@pytest.mark.parametrize("field", ["base_revision", "expert_id"])
def test_nul_in_an_upload_form_field(env: Env, field: str) -> None:
    before = env.state()
    value = (env.revision if field == "base_revision" else env.expert_id) + "\x00"
    response = env.submit(**{field: value})
    body = refused(env, response, before, 400, "invalid_characters")
    assert body["errors"][0]["path"] == field


def test_nul_in_a_base_model_name(env: Env) -> None:
    files = make_base_files(seed=3)
    before = env.state()
    response = env.client.post(
        "/v1/base-models",
        files={
            "config": ("config.json", files["config.json"]),
            "tokenizer": ("tokenizer.json", files["tokenizer.json"]),
            "weights": ("model.safetensors", files["model.safetensors"]),
        },
        data={"name": "base\x00"},
        headers=env.admin,
    )
    refused(env, response, before, 400, "invalid_characters")
    # The same text inside config.json (its name becomes the revision's name).
    config = json.loads(files["config.json"])
    for name in ("base\x00", "\ud800"):
        config["name"] = name
        response = env.client.post(
            "/v1/base-models",
            files={
                "config": ("config.json", json.dumps(config).encode()),
                "tokenizer": ("tokenizer.json", files["tokenizer.json"]),
                "weights": ("model.safetensors", files["model.safetensors"]),
            },
            headers=env.admin,
        )
        refused(env, response, before, 422, "config_invalid")


# -- 1b: JSON bodies -------------------------------------------------------------------------


def _json_cases(env: Env) -> list[tuple[str, str, dict[str, str], str]]:
    """(method + path, JSON text with a placeholder X for the bad string, headers, path)."""
    rev = env.revision
    ex = env.expert_id
    return [
        ("/v1/search", f'{{"texts": [X], "base_revision": "{rev}"}}', {}, "$.texts[0]"),
        ("/v1/search", '{"texts": ["a"], "base_revision": X}', {}, "$.base_revision"),
        (
            "/v1/compositions",
            f'{{"method": "ensemble", "base_revision": "{rev}", "texts": [X]}}',
            env.alice,
            "$.texts[0]",
        ),
        (
            "/v1/compositions",
            f'{{"method": "ensemble", "base_revision": "{rev}", "experts": [X]}}',
            env.alice,
            "$.experts[0]",
        ),
        (
            "/v1/evaluations",
            f'{{"expert_id": "{ex}", "text_sets": {{"a": [X]}}}}',
            env.alice,
            "$.text_sets.a[0]",
        ),
        (
            "/v1/evaluations",
            '{"expert_id": X, "text_sets": {"a": ["t"]}}',
            env.alice,
            "$.expert_id",
        ),
        (f"/v1/experts/{ex}/disable", '{"reason": X}', env.admin, "$.reason"),
        ("/v1/jobs/lease", '{"worker": X}', env.worker, "$.worker"),
        ("/v1/jobs/job_x/fail", '{"fencing_token": 1, "error": X}', env.worker, "$.error"),
    ]


@pytest.mark.parametrize(
    ("bad", "message"),
    [('"\\ud800"', "surrogate"), ('"a\\udfffb"', "surrogate"), ('"a\\u0000b"', "NUL")],
)
def test_unstorable_strings_in_json_bodies(env: Env, bad: str, message: str) -> None:
    before = env.state()
    for path, template, headers, where in _json_cases(env):
        response = env.client.post(
            path,
            content=template.replace("X", bad).encode(),
            headers={**headers, "Content-Type": "application/json"},
        )
        body = refused(env, response, before, 400, "invalid_characters")
        assert body["errors"][0]["path"] == where, (path, body)
        assert message in body["errors"][0]["message"]
    # In a key, and with no Content-Type at all (FastAPI reads that body as JSON too).
    response = env.client.post(
        "/v1/evaluations",
        content=f'{{"expert_id": "{env.expert_id}", "text_sets": {{{bad}: ["t"]}}}}'.encode(),
        headers=env.alice,
    )
    body = refused(env, response, before, 400, "invalid_characters")
    assert body["errors"][0]["path"].startswith("$.text_sets[")
    # A surrogate *pair* is a character: the request goes through to the route.
    fine = env.client.post(
        "/v1/search",
        content=f'{{"texts": ["\\ud83d\\ude00 tide"], "base_revision": "{env.revision}"}}'.encode(),
        headers={"Content-Type": "application/json"},
    )
    assert fine.status_code == 200, fine.text


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_json_numbers(env: Env, number: str) -> None:
    before = env.state()
    response = env.client.post(
        "/v1/jobs/job_x/heartbeat",
        content=f'{{"fencing_token": 1, "progress": {{"loss": {number}}}}}'.encode(),
        headers={**env.worker, "Content-Type": "application/json"},
    )
    refused(env, response, before, 400, "invalid_json")


@pytest.mark.parametrize("depth", [65, 5000, 30_000])
def test_deeply_nested_json(env: Env, depth: int) -> None:
    before = env.state()
    nested = "[" * depth + "]" * depth
    response = env.client.post(
        "/v1/jobs/job_x/heartbeat",
        content=f'{{"fencing_token": 1, "progress": {{"a": {nested}}}}}'.encode(),
        headers={**env.worker, "Content-Type": "application/json"},
    )
    refused(env, response, before, 400, "json_too_deep")


def test_a_multipart_job_result_gets_the_same_checks(env: Env) -> None:
    before = env.state()
    for result, code in [
        ('{"details": {"note": "\\ud800"}}', "invalid_characters"),
        ('{"details": {"loss": NaN}}', "invalid_result"),
        ('{"d": ' + "[" * 100 + "]" * 100 + "}", "json_too_deep"),
        ('{"d": ' + "[" * 100_000 + "]" * 100_000 + "}", "invalid_result"),
    ]:
        response = env.client.post(
            "/v1/jobs/job_x/complete",
            files={"weights": ("w", b"x")},
            data={"fencing_token": "1", "result": result},
            headers=env.worker,
        )
        refused(env, response, before, 400, code)


# -- size cap: refused before the body is read -----------------------------------------------


def test_json_bodies_over_the_cap(env: Env) -> None:
    before = env.state()
    big = json.dumps({"texts": ["a" * JSON_CAP], "base_revision": env.revision}).encode()
    declared = env.client.post(
        "/v1/search", content=big, headers={"Content-Type": "application/json"}
    )
    refused(env, declared, before, 413, "request_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(64):
            yield b" " * 4096

    chunked = env.client.post(
        "/v1/search", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert "content-length" not in chunked.request.headers
    refused(env, chunked, before, 413, "request_too_large")
    # Another media type is capped the same way (the app takes nothing else unstreamed).
    plain = env.client.post(
        "/v1/search", content=b"x" * (JSON_CAP + 1), headers={"Content-Type": "text/plain"}
    )
    refused(env, plain, before, 413, "request_too_large")
    # A multipart body sent where no upload is streamed is capped too.
    form = env.client.post(
        "/v1/search", files={"f": ("f", b"x" * (JSON_CAP + 1))}, headers=env.alice
    )
    refused(env, form, before, 413, "request_too_large")


def test_a_search_at_its_content_limit_fits_under_the_cap(env: Env) -> None:
    texts = ["tide pools and sea stars " * 40] * 60  # 60 KiB of the 64 KiB search limit
    response = env.client.post("/v1/search", json={"texts": texts, "base_revision": env.revision})
    assert response.status_code == 200, response.text


def test_streamed_uploads_are_not_capped(env: Env) -> None:
    """An upload larger than the JSON cap streams to staging as before."""
    body = "# Notes\n\n" + "Tide-pool field notes, one line at a time.\n" * 4000
    sheet = make_datasheet(body=body)
    assert len(sheet) > JSON_CAP
    response = env.submit(weights=env.expert(seed=11), datasheet=sheet)
    assert response.status_code == 201, response.text


def test_the_default_cap_fits_the_largest_json_content() -> None:
    settings = Settings()
    assert settings.max_json_body_bytes is None
    content = max(settings.max_job_payload_bytes, settings.max_job_result_bytes)
    # Escaped at worst threefold (a 4-byte character as a 12-byte surrogate-pair escape).
    assert settings.json_body_limit >= 3 * content
    assert settings.json_body_limit == 4 * MiB
    assert Settings(max_json_body_bytes=1000).json_body_limit == 1000


# -- 1c: what still reaches the database is a 400, not a 500 ---------------------------------


def test_a_value_the_database_refuses_is_a_400(env: Env) -> None:
    """Defence in depth, behind the checks above: a route that queries with an unstorable
    value answers 400 ``invalid_value`` (DataError on PostgreSQL, the driver's encoding or
    overflow error on SQLite)."""

    def probe(value: str, session: SessionDep) -> dict[str, int]:
        bad: Any = {"big": 2**63, "surrogate": "\ud800", "nul": "a\x00b"}[value]
        column = Expert.latest_version if value == "big" else Expert.name
        with session.begin():
            return {"n": len(list(session.scalars(select(Expert).where(column == bad))))}

    env.app.add_api_route("/test-only/unstorable/{value}", probe, methods=["GET"])
    dialect = env.app.state.runtime.engine.dialect.name
    for value in ("big", "surrogate", "nul"):
        response = env.client.get(f"/test-only/unstorable/{value}")
        if value == "nul" and dialect == "sqlite":
            assert response.status_code == 200  # SQLite stores NUL in text
        else:
            assert response.status_code == 400, (value, response.text)
            assert response.json()["code"] == "invalid_value"


# -- 2: datasheets that crashed an upload ----------------------------------------------------

VALID = make_datasheet()
NAME = b"name: Tide-pool ecology notes"


def _sheet(old: bytes, new: bytes) -> bytes:
    assert VALID.count(old) == 1
    return VALID.replace(old, new)


ALIAS_BOMB = b"\n".join(
    [b'x-l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"x-l{i}: &l{i} [{','.join([f'*l{i - 1}'] * 9)}]".encode() for i in range(1, 9)]
)

DATASHEETS: dict[str, tuple[bytes, str, str]] = {
    # case: (datasheet, code, the path errors[0] names)
    "400 nested brackets": (
        _sheet(NAME, b"name: " + b"[" * 400 + b"]" * 400),
        "datasheet_front_matter",
        "$.name",
    ),
    "400 nested mappings": (
        _sheet(NAME, b"name: x\nx-deep: " + b"{a: " * 400 + b"1" + b"}" * 400),
        "datasheet_front_matter",
        "$.x-deep" + ".a" * 30,
    ),
    "4301-digit integer": (
        _sheet(b"token_count: 1250000", b"token_count: " + b"9" * 4301),
        "datasheet_front_matter",
        "$.token_count",
    ),
    "integer beyond 64 bits": (
        _sheet(b"token_count: 1250000", b"token_count: " + b"9" * 30),
        "datasheet_invalid",
        "$.token_count",
    ),
    "alias bomb": (_sheet(NAME, NAME + b"\n" + ALIAS_BOMB), "datasheet_front_matter", "$.x-l1[0]"),
    "one alias": (_sheet(NAME, b"name: &n x\nx-copy: *n"), "datasheet_front_matter", "$.x-copy"),
    "surrogate in name": (_sheet(NAME, b'name: "\\ud800"'), "datasheet_invalid", "$.name"),
    "surrogate in a key": (
        _sheet(NAME, NAME + b'\n"x-\\udc00": 1'),
        "datasheet_invalid",
        "$['x-\\udc00']",
    ),
    "NUL in name": (_sheet(NAME, b'name: "tide\\0pools"'), "datasheet_invalid", "$.name"),
    "NUL in domain": (
        _sheet(b"domain: Field", b'domain: "a\\x00b"\nx-was: Field'),
        "datasheet_invalid",
        "$.domain",
    ),
    "raw NUL in the body": (VALID + b"\x00", "datasheet_invalid", "body"),
    "name wider than its column": (
        _sheet(NAME, b"name: " + b"n" * 201),
        "datasheet_invalid",
        "$.name",
    ),
    "languages wider than their column": (
        _sheet(
            b"language:\n- en",
            b"language: [" + b", ".join(b"en-x%02d" % i for i in range(40)) + b"]",
        ),
        "datasheet_invalid",
        "$.language",
    ),
}


@pytest.mark.parametrize("case", sorted(DATASHEETS))
def test_hostile_datasheets_are_refused_before_any_blob(env: Env, case: str) -> None:
    sheet, code, path = DATASHEETS[case]
    before = env.state()
    response = env.submit(weights=env.expert(seed=21), datasheet=sheet)
    body = refused(env, response, before, 422, code)
    assert body["errors"][0]["path"] == path, body


# -- 3: metadata that disagrees with the tensors ---------------------------------------------


@pytest.mark.parametrize(
    "layers", ["[1, 0]", "[0, 1, 2]", "[0, 0, 1]", "[0, 1.0]", '"0,1"', "{}", "0"]
)
def test_layers_that_disagree_with_the_tensors(env: Env, layers: str) -> None:
    """The base's schema states no layers; the file holds layers 0 and 1. (Declaring
    fewer layers, "[0]", makes the other layer's tensors unexpected: a tensor_set_mismatch
    naming them, tests/registry/test_experts.py.)"""
    assert "layers" not in env.schema
    before = env.state()
    response = env.submit(weights=env.expert(seed=31, metadata_overrides={"layers": layers}))
    body = refused(env, response, before, 422, "metadata_invalid")
    assert body["errors"][0]["key"] == "layers"


def test_the_layers_the_tensors_hold_are_accepted(env: Env) -> None:
    for layers in ("[0,1]", "[0, 1]"):
        response = env.submit(weights=env.expert(seed=41, metadata_overrides={"layers": layers}))
        assert response.status_code in (200, 201), response.text
