"""Schemathesis against the registry app, on SQLite and PostgreSQL, anonymous and with a
contributor token: every check it has, the examples, fuzzing (positive and negative data)
and stateful phases, and the coverage phase (boundary and negative values of every
parameter: with the token in CI, both ways in the heavy variant), against the app in
process (its lifespan runs as under a server). Then every operation that needs a token is
called without one, with real ids and bodies: each must be a 401.

The OpenAPI document is the app's own (registry/api/openapi.py), copied with examples that
name what the test stored first (a base model, two experts, a composition, its job), so
that the examples phase reaches the 200s and 206s and their bodies and headers are checked
too, not only the 404s of made-up ids.

Figures (``pytest -s``): operations, cases, server errors, schema violations (body, content
type, headers), undocumented statuses, other check failures, and the protected operations
that answered 2xx without a token. All must be 0. ``AGORA_ADVERSARIAL=heavy`` runs more
examples per operation (docs/reliability.md).

The refusals the document cannot state in JSON Schema are told apart from a rejected
valid request (``positive_data_acceptance``), the first two by re-checking the request
itself: a NUL or a lone surrogate anywhere in it (400 ``invalid_characters``,
registry/api/hygiene.py); an opaque page cursor this server did not issue (400
``invalid_cursor``); an upload whose bytes are not a valid artifact (422 with a validation
code, docs/validation.md); a new expert's version other than 1 (400 ``invalid_version``);
and a composition's rules between fields or on what is stored (``COMPOSITION_RULES``).
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from helpers.adversarial import HEAVY, report, scaled
from helpers.artifacts import make_base_files, make_datasheet, make_expert_bytes
from schemathesis.checks import CHECKS
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import events, from_schema
from schemathesis.openapi.checks import RejectedPositiveData
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import positive_data_acceptance

from registry.app import create_app
from registry.errors import BadRequest
from registry.services.experts import decode_cursor
from registry.settings import Settings

SCHEMA_CHECKS = {
    "response_schema_conformance",
    "content_type_conformance",
    "response_headers_conformance",
}
COMPOSITION_RULES = {
    (400, "invalid_weights"),
    (400, "invalid_params"),
    (400, "too_few_experts"),
    (400, "too_many_experts"),
    (400, "duplicate_expert"),
    (422, "base_mismatch"),
    (422, "no_experts_found"),
}
UPLOADS = {
    ("POST", "/v1/experts"),
    ("POST", "/v1/base-models"),
    ("POST", "/v1/jobs/{job_id}/complete"),
}


# -- the app, with something stored ----------------------------------------------------------


@dataclass
class Seeded:
    app: FastAPI
    tokens: dict[str, str]
    values: dict[str, Any]


def _settings(database_url: str, data_dir: Path) -> Settings:
    # Rate limits off: thousands of requests from one address in seconds are the point here
    # (the limits have their own tests).
    return Settings(
        data_dir=data_dir,
        database_url=database_url,
        embedded_worker=False,
        rate_limit_anonymous_per_second=0,
        rate_limit_token_per_second=0,
        rate_limit_search_per_second=0,
    )


def _seed(database_url: str, data_dir: Path) -> Seeded:
    from registry.services.tokens import create_token

    app = create_app(_settings(database_url, data_dir))
    tokens: dict[str, str] = {}
    with TestClient(app) as client:
        runtime = app.state.runtime
        with runtime.sessions() as session, session.begin():
            for role in ("admin", "contributor", "worker"):
                row, tokens[role] = create_token(session=session, name=f"{role}-1", role=role)
                token_id = row.id  # the worker's: DELETE /v1/tokens/{token_id}'s example

        def auth(role: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {tokens[role]}"}

        files = make_base_files()
        base = client.post(
            "/v1/base-models",
            files={
                "config": ("config.json", files["config.json"]),
                "tokenizer": ("tokenizer.json", files["tokenizer.json"]),
                "weights": ("model.safetensors", files["model.safetensors"]),
            },
            headers=auth("admin"),
        )
        assert base.status_code == 201, base.text
        revision, schema = base.json()["revision"], base.json()["expert_schema"]
        experts = []
        for seed, name in [(1, "alpha"), (2, "beta")]:
            weights = make_expert_bytes(schema, base_revision=revision, seed=seed)
            sheet = make_datasheet(name=name, samples=[f"{name} sample text"])
            submitted = client.post(
                "/v1/experts",
                files={"weights": ("e.safetensors", weights), "datasheet": ("D.md", sheet)},
                data={"base_revision": revision},
                headers=auth("contributor"),
            )
            assert submitted.status_code == 201, submitted.text
            experts.append(submitted.json()["id"])
        composition = client.post(
            "/v1/compositions",
            json={"base_revision": revision, "method": "average", "experts": experts},
            headers=auth("contributor"),
        )
        assert composition.status_code == 202, composition.text
        report = client.post(
            f"/v1/experts/{experts[1]}/reports",
            json={"reason": "a seeded report"},
            headers=auth("contributor"),
        )
        assert report.status_code == 201, report.text
    return Seeded(
        app=app,
        tokens=tokens,
        values={
            "revision": revision,
            "field": "config",
            "expert_id": experts[0],
            "composition_id": composition.json()["composition_id"],
            "job_id": composition.json()["job_id"],
            "experts": experts,
            "token_id": token_id,
            "report_id": report.json()["id"],
            # Monitoring (docs/governance.md): nothing stored under them; a call without a
            # token is refused before any lookup.
            "text_set_id": 1,
            "schedule_id": 1,
        },
    )


def _with_examples(document: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """The app's document with examples naming what ``_seed`` stored."""
    doc = copy.deepcopy(document)
    for operations in doc["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", ()):
                name = parameter["name"]
                if parameter["in"] == "path" and name in values:
                    parameter["example"] = values[name]
                elif name == "Range":
                    parameter["example"] = "bytes=0-15"
                elif name == "version":
                    parameter["example"] = 1
    bodies = {
        ("/v1/search", "post"): {"texts": ["alpha sample"], "base_revision": values["revision"]},
        ("/v1/compositions", "post"): {
            "method": "ensemble",
            "base_revision": values["revision"],
            "experts": values["experts"],
        },
        ("/v1/evaluations", "post"): {
            "expert_id": values["expert_id"],
            "text_sets": {"held_out": ["a text to score"]},
        },
        ("/v1/jobs/lease", "post"): {"worker": "schemathesis"},
    }
    for (path, method), example in bodies.items():
        content = doc["paths"][path][method]["requestBody"]["content"]["application/json"]
        content["example"] = example
    return doc


# -- what a run found ------------------------------------------------------------------------


@dataclass
class Findings:
    operations: int = 0
    cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    server_errors: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    protected_ok_anonymous: int = 0
    errors: list[str] = field(default_factory=list)

    def count(self, check: str) -> int:
        return self.failures[check]

    @property
    def schema_violations(self) -> int:
        return sum(self.failures[name] for name in SCHEMA_CHECKS)

    @property
    def undocumented_statuses(self) -> int:
        return self.failures["status_code_conformance"]

    @property
    def other_failures(self) -> int:
        known = SCHEMA_CHECKS | {"status_code_conformance", "not_a_server_error"}
        return sum(n for name, n in self.failures.items() if name not in known)

    def describe(self) -> str:
        counts = [f"{n} x {name}" for name, n in self.failures.items()]
        lines = [f"{key}\n    {example}" for key, example in self.examples.items()]
        return "\n".join(counts + lines + self.errors)


def _protected(document: dict[str, Any]) -> set[tuple[str, str]]:
    """(METHOD, path template) of the operations that need a token."""
    return {
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
        if {} not in operation.get("security", [{}])
    }


def _record(findings: Findings, event: events.ScenarioFinished, protected: set) -> None:
    recorder = event.recorder
    findings.cases += len(recorder.cases)
    for case_id, interaction in recorder.interactions.items():
        response = interaction.response
        if response is None:
            continue
        findings.statuses[response.status_code] += 1
        if response.status_code >= 500:
            findings.server_errors += 1
        node = recorder.cases.get(case_id)
        if node is None:
            continue
        key = (node.value.operation.method.upper(), node.value.operation.path)
        sent = {name.lower() for name in interaction.request.headers}
        if key in protected and "authorization" not in sent and 200 <= response.status_code < 300:
            findings.protected_ok_anonymous += 1
    for case_id, checks in recorder.checks.items():
        for check in checks:
            if check.failure_info is None:
                continue
            findings.failures[check.name] += 1
            interaction = recorder.interactions.get(case_id)
            response = interaction.response if interaction is not None else None
            answer = "no response"
            if response is not None:
                answer = f"{response.status_code} {_problem_code(response)}"
            failure = check.failure_info.failure
            findings.examples.setdefault(
                f"{check.name} {recorder.label} -> {answer}",
                f"{failure.title}: {failure.message[:300]}\n    "
                f"{check.failure_info.code_sample[:3000]}",
            )


def _run(
    seeded: Seeded, document: dict[str, Any], headers: dict[str, str], *, coverage: bool
) -> Findings:
    config = SchemathesisConfig.from_dict(
        {
            "seed": 14,
            "workers": 1,
            "continue-on-failure": True,
            "headers": headers,
            "generation": {"max-examples": scaled(ci=4, heavy=100)},
            "checks": {"positive_data_acceptance": {"enabled": False}},
            "phases": {
                # Methods no route of this API has: 405 with the right Allow (OPTIONS has
                # its own test, tests/registry/test_openapi.py).
                "coverage": {"enabled": coverage, "unexpected-methods": ["DELETE", "PATCH"]},
            },
            # Hypothesis's health checks guard test quality, not the API; a slow shared
            # machine trips "too slow" on the multipart bodies.
            "suppress-health-check": ["all"],
        }
    )
    schema = schemathesis.openapi.from_dict(document, config=config)
    # As schemathesis.openapi.from_asgi does: requests go to the app in process.
    schema.app = seeded.app
    protected = _protected(document)
    findings = Findings(operations=sum(len(ops) for ops in document["paths"].values()))
    # Registered for this run only: the registry of checks is the process's.
    schemathesis.check(valid_requests_are_accepted)
    try:
        for event in from_schema(schema).execute():
            if isinstance(event, events.ScenarioFinished):
                _record(findings, event, protected)
            elif isinstance(event, (events.NonFatalError, events.FatalError)):
                findings.errors.append(repr(event))
    finally:
        CHECKS.unregister(valid_requests_are_accepted.__name__)
        # The app's lifespan, which schemathesis started: its engine and files are closed.
        asgi.shutdown_lifespans()
    return findings


# -- refusals the schema cannot state, told apart from a rejected valid request --------------


def _has_bad_text(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value or any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, bytes):
        return b"\x00" in value
    if isinstance(value, dict):
        return any(_has_bad_text(k) or _has_bad_text(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_has_bad_text(v) for v in value)
    return False


def _problem_code(response: schemathesis.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("code") if isinstance(body, dict) else None


def _documented_refusal(response: schemathesis.Response, case: schemathesis.Case) -> bool:
    code = _problem_code(response)
    if response.status_code == 400 and code == "invalid_characters":
        parts = [case.path_parameters, case.query, case.headers, case.body]
        return any(_has_bad_text(part) for part in parts)
    if response.status_code == 400 and code == "invalid_cursor":
        try:
            decode_cursor(str((case.query or {}).get("cursor", "")))
        except BadRequest:
            return True
        return False
    if response.status_code == 422 and (case.method, case.operation.path) in UPLOADS:
        # Bytes drawn at random are not a safetensors expert or a datasheet.
        return code is not None
    if (case.method, case.operation.path) == ("POST", "/v1/experts") and code == "invalid_version":
        # A new expert (no expert_id) starts at version 1: a rule between two form fields
        # that a multipart schema here cannot carry (Schemathesis's coverage phase fails on
        # an if/else around binary parts).
        form = case.body if isinstance(case.body, dict) else {}
        return not str(form.get("expert_id") or "").strip() and str(form.get("version")) != "1"
    if response.status_code == 451 and code in (None, "expert_disabled", "digest_disabled"):
        # The contributor owns the stored experts and may withdraw them
        # (POST /v1/experts/{expert_id}/withdraw, docs/governance.md): from then on what
        # uses them is refused, like a 409 that depends on what is stored. (A HEAD's 451
        # has no body, so no code.)
        return code is not None or case.method == "HEAD"
    if (case.method, case.operation.path) == ("POST", "/v1/compositions"):
        # Rules between fields, or on what is stored, that JSON Schema cannot state: as
        # many weights as experts, a method's own parameters and expert count, two
        # references to one expert, experts of the requested base.
        return (response.status_code, code) in COMPOSITION_RULES
    return False


def valid_requests_are_accepted(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    """``positive_data_acceptance``, less the documented refusals above."""
    try:
        return positive_data_acceptance(ctx, response, case)
    except RejectedPositiveData:
        if _documented_refusal(response, case):
            return None
        raise


def _sweep_protected(seeded: Seeded, document: dict[str, Any]) -> tuple[int, list[str]]:
    """Every operation that needs a token, called without one, with the real ids and the
    example bodies: each must be 401 ``missing_token``. Returns (operations, the others)."""
    protected = sorted(_protected(document))
    answered = []
    with TestClient(seeded.app) as client:
        for method, path in protected:
            operation = document["paths"][path][method.lower()]
            body = (
                operation.get("requestBody", {})
                .get("content", {})
                .get("application/json", {})
                .get("example")
            )
            url = path.format(**seeded.values)
            response = client.request(method, url, json=body)
            code = response.json().get("code") if response.content else None
            if response.status_code != 401 or code != "missing_token":
                answered.append(f"{method} {url}: {response.status_code} {code}")
    return len(protected), answered


# -- the tests -------------------------------------------------------------------------------


def test_schemathesis_finds_no_server_error_and_no_lie(database_url: str, tmp_path: Path) -> None:
    """Anonymous, then with a contributor token, against one stored registry."""
    backend = "postgresql" if database_url.startswith("postgresql") else "sqlite"
    seeded = _seed(database_url, tmp_path / "agora")
    document = _with_examples(seeded.app.openapi(), seeded.values)
    # The coverage phase (boundary and negative values of every parameter) runs with the
    # token, where it reaches past the 401s; anonymous too in the heavy variant.
    for who, headers, coverage in [
        ("anonymous", {}, HEAVY),
        ("contributor", {"Authorization": f"Bearer {seeded.tokens['contributor']}"}, True),
    ]:
        started = time.monotonic()
        findings = _run(seeded, document, headers, coverage=coverage)
        report(
            f"schemathesis {backend} {who}",
            operations=findings.operations,
            cases=findings.cases,
            requests=sum(findings.statuses.values()),
            server_errors=findings.server_errors,
            schema_violations=findings.schema_violations,
            undocumented_statuses=findings.undocumented_statuses,
            other_failures=findings.other_failures,
            protected_ok_without_token=findings.protected_ok_anonymous,
            statuses=dict(sorted(findings.statuses.items())),
            seconds=round(time.monotonic() - started, 1),
        )
        assert not findings.errors, findings.describe()
        assert findings.cases >= findings.operations
        # Reached the stored resources, not only 4xx answers.
        assert findings.statuses[200] > 0, findings.statuses
        assert findings.statuses[206] > 0, findings.statuses
        assert findings.server_errors == 0, findings.describe()
        assert findings.schema_violations == 0, findings.describe()
        assert findings.undocumented_statuses == 0, findings.describe()
        assert findings.other_failures == 0, findings.describe()
        assert findings.protected_ok_anonymous == 0, findings.describe()
        assert not findings.failures, findings.describe()

    protected, answered = _sweep_protected(seeded, document)
    report(
        f"protected operations {backend}",
        protected_operations=protected,
        protected_ok_without_token=len(answered),
    )
    assert protected >= 12
    assert not answered, answered
