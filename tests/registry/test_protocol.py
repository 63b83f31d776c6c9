"""The contracts package seen from both ends: one spec table that the registry, the worker
and the runner derive their methods and kinds from, payloads the registry builds that the
worker parses back unchanged, and wire models that refuse what does not fit."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers.artifacts import make_datasheet
from pydantic import ValidationError

import registry.protocol as protocol
from registry.protocol import (
    COMPOSE_KINDS,
    EVALUATE_KIND,
    JOB_KINDS,
    MANIFEST_FORMAT,
    METHOD_SPECS,
    METHODS,
    ComposePayload,
    EvaluatePayload,
    Manifest,
    MethodSpec,
    produces_expert,
    spec_for_kind,
)
from registry.services import jobs as jobs_svc
from worker.handlers import COMPOSE_HANDLERS, HANDLERS, KINDS, parse_compose, required_inputs
from worker.runner import expand_kinds

Api = Any
DIGEST = "sha256:" + "ab" * 32
REVISION = "cd" * 32


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def submit_expert(api: Api, *, seed: int, name: str) -> str:
    response = api.submit(
        weights=api.expert_bytes(seed=seed),
        datasheet=make_datasheet(name=name, samples=[f"{name} sample text"]),
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def lease(api: Api, kind: str) -> dict[str, Any]:
    response = api.client.post(
        "/v1/jobs/lease",
        json={"worker": "protocol-test", "kinds": [kind]},
        headers=auth(api.tokens.worker),
    )
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()["job"]
    assert job["kind"] == kind
    return job


# -- one table --------------------------------------------------------------------------------


def test_the_worker_the_queue_and_the_runner_run_the_kinds_of_the_spec_table() -> None:
    assert tuple(HANDLERS) == KINDS == JOB_KINDS == jobs_svc.KINDS
    assert set(COMPOSE_HANDLERS) == set(METHOD_SPECS) == set(METHODS)
    assert (*COMPOSE_KINDS, EVALUATE_KIND) == JOB_KINDS
    assert tuple(spec.job_kind for spec in METHOD_SPECS.values()) == COMPOSE_KINDS
    for spec in METHOD_SPECS.values():
        assert spec_for_kind(spec.job_kind) is spec
        assert produces_expert(spec.job_kind) is spec.produces_expert
    assert spec_for_kind(EVALUATE_KIND) is None
    assert spec_for_kind("compose.soup") is None
    assert not produces_expert(EVALUATE_KIND)
    # What a worker started with ``--kinds compose`` leases: every method's kind.
    assert expand_kinds(["compose"]) == list(COMPOSE_KINDS)


def test_the_methods_that_produce_an_expert_name_it() -> None:
    producers = {s.name for s in METHOD_SPECS.values() if s.produces_expert}
    assert producers == {"average", "distill"}
    for spec in METHOD_SPECS.values():
        assert (spec.derived_name is not None) == spec.produces_expert
    with pytest.raises(ValueError, match="names it"):
        MethodSpec("soup", "s", "p", min_experts=1, takes_weights=True, produces_expert=True)


def test_the_contracts_package_imports_pydantic_and_the_standard_library_only() -> None:
    allowed = {"pydantic", "registry"} | set(sys.stdlib_module_names) | {"__future__"}
    for path in Path(protocol.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
                if name.startswith("registry"):
                    assert name.startswith("registry.protocol"), f"{path.name} imports {name}"


# -- the registry builds, the worker parses ----------------------------------------------------


def test_the_registry_refuses_a_method_outside_the_table(api: Api) -> None:
    a = submit_expert(api, seed=1, name="alpha")
    response = api.client.post(
        "/v1/compositions",
        json={"base_revision": api.base.revision, "method": "soup", "experts": [a]},
        headers=auth(api.tokens.alice),
    )
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "invalid_method"
    assert ", ".join(METHODS) in response.json()["detail"]


@pytest.mark.parametrize("method", METHODS)
def test_the_registry_queues_every_method_and_the_worker_parses_its_payload(
    api: Api, method: str
) -> None:
    spec = METHOD_SPECS[method]
    a = submit_expert(api, seed=1, name="alpha")
    b = submit_expert(api, seed=2, name="beta")
    body: dict[str, Any] = {
        "base_revision": api.base.revision,
        "method": method,
        "experts": [a, f"{b}@1"],
        "texts": ["a text of the target domain"],
    }
    if spec.takes_weights:
        body["weights"] = [3, 1]
    if spec.has_base_path:
        body["params"] = {"base_weight": 2.0}
    response = api.client.post("/v1/compositions", json=body, headers=auth(api.tokens.alice))
    assert response.status_code == 202, response.text

    payload = lease(api, spec.job_kind)["payload"]
    # Lossless: the stored payload is the model's JSON form.
    assert ComposePayload.model_validate(payload).model_dump(mode="json") == payload
    job = parse_compose(spec.job_kind, json.loads(json.dumps(payload)))
    assert job.spec is spec
    assert [r.id for r in job.refs] == [a, b]
    assert all(r.version == 1 and r.digest.startswith("sha256:") for r in job.refs)
    assert job.texts == ["a text of the target domain"]
    # The worker's check of the params is the registry's: nothing changes on the way.
    assert job.params == payload["params"]
    assert set(job.params) >= set(spec.defaults())
    assert job.weights == (pytest.approx([0.75, 0.25]) if spec.takes_weights else None)
    assert job.with_base is spec.has_base_path
    # base_weight is on the scale of the weights, which the registry normalised: 2 / 4.
    assert job.base_weight == (pytest.approx(0.5) if spec.has_base_path else None)
    revision, refs = required_inputs(spec.job_kind, payload)
    assert revision == api.base.revision
    assert refs == job.refs


def test_evaluation_payloads_round_trip_for_an_expert_and_a_composition(api: Api) -> None:
    a = submit_expert(api, seed=1, name="alpha")
    b = submit_expert(api, seed=2, name="beta")
    sets = {"news": ["some text"]}
    response = api.client.post(
        "/v1/evaluations", json={"expert_id": a, "text_sets": sets}, headers=auth(api.tokens.alice)
    )
    assert response.status_code == 202, response.text
    payload = lease(api, EVALUATE_KIND)["payload"]
    assert EvaluatePayload.model_validate(payload).model_dump(mode="json") == payload
    revision, refs = required_inputs(EVALUATE_KIND, payload)
    assert revision == api.base.revision
    assert [r.id for r in refs] == [a]

    ensemble = METHOD_SPECS["ensemble"]
    queued = api.client.post(
        "/v1/compositions",
        json={"base_revision": api.base.revision, "method": ensemble.name, "experts": [a, b]},
        headers=auth(api.tokens.alice),
    ).json()
    job = lease(api, ensemble.job_kind)
    result = {"weights": [0.25, 0.25], "base_weight": 0.5, "with_base": True, "metrics": None}
    done = api.client.post(
        f"/v1/jobs/{job['id']}/complete",
        json={"fencing_token": job["fencing_token"], "result": result},
        headers=auth(api.tokens.worker),
    )
    assert done.status_code == 200, done.text
    stored = api.client.get(f"/v1/compositions/{queued['composition_id']}").json()["manifest"]
    manifest = Manifest.model_validate(stored)
    assert manifest.as_json() == stored
    assert manifest.weights() == [0.25, 0.25]
    assert manifest.base_path() == (True, 0.5)

    response = api.client.post(
        "/v1/evaluations",
        json={"composition_id": queued["composition_id"], "text_sets": sets},
        headers=auth(api.tokens.alice),
    )
    assert response.status_code == 202, response.text
    payload = lease(api, EVALUATE_KIND)["payload"]
    parsed = EvaluatePayload.model_validate(payload)
    assert parsed.subject.kind == "composition"
    assert parsed.model_dump(mode="json") == payload
    revision, refs = required_inputs(EVALUATE_KIND, payload)
    assert [r.id for r in refs] == [a, b]


# -- the models refuse what does not fit -----------------------------------------------------


def _payload(**change: Any) -> dict[str, Any]:
    ref = {"id": "ex_a", "version": 1, "digest": DIGEST, "size": 10}
    return {
        "composition_id": "cmp_1",
        "method": "ensemble",
        "base_revision": REVISION,
        "experts": [ref, {**ref, "id": "ex_b"}],
        "weights": None,
        "texts": ["x"],
        "params": {},
        **change,
    }


@pytest.mark.parametrize(
    ("ref", "field"),
    [
        ({"version": 1, "digest": DIGEST}, "id"),
        ({"id": "", "version": 1, "digest": DIGEST}, "id"),
        ({"id": "ex_a", "digest": DIGEST}, "version"),
        ({"id": "ex_a", "version": 0, "digest": DIGEST}, "version"),
        ({"id": "ex_a", "version": True, "digest": DIGEST}, "version"),
        ({"id": "ex_a", "version": "1", "digest": DIGEST}, "version"),
        ({"id": "ex_a", "version": 1}, "digest"),
        ({"id": "ex_a", "version": 1, "digest": "md5:" + "ab" * 16}, "digest"),
        ({"id": "ex_a", "version": 1, "digest": DIGEST.upper()}, "digest"),
        ({"id": "ex_a", "version": 1, "digest": DIGEST[:-1]}, "digest"),
        ({"id": "ex_a", "version": 1, "digest": DIGEST, "size": -1}, "size"),
    ],
)
def test_compose_payloads_refuse_malformed_refs(ref: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ComposePayload.model_validate(_payload(experts=[ref]))
    assert [e["loc"] for e in caught.value.errors()] == [("experts", 0, field)]


@pytest.mark.parametrize(
    "change",
    [
        {"experts": []},
        {"experts": "ex_a"},
        {"weights": [1.0]},
        {"weights": [0.0, 0.0]},
        {"weights": [-1.0, 2.0]},
        {"weights": [float("nan"), 1.0]},
        {"base_revision": "CD" * 32},
        {"base_revision": "cd" * 31},
        {"method": "soup"},
        {"texts": [1]},
        {"composition_id": ""},
    ],
)
def test_compose_payloads_refuse_what_the_registry_never_sends(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ComposePayload.model_validate(_payload(**change))


def test_a_valid_payload_is_kept_as_sent() -> None:
    payload = _payload(weights=[0.5, 0.5])
    assert ComposePayload.model_validate(payload).model_dump(mode="json") == payload


def _manifest(method: str, **change: Any) -> dict[str, Any]:
    ref = {"id": "ex_a", "version": 1, "digest": DIGEST, "size": 10}
    return {
        "format": MANIFEST_FORMAT,
        "id": "cmp_1",
        "method": method,
        "base_revision": REVISION,
        "experts": [{**ref, "weight": None}],
        "params": {},
        "output": None,
        "metrics": None,
        **change,
    }


def test_manifests_name_what_the_composition_is_computed_from() -> None:
    output = {"id": "ex_new", "version": 1, "digest": "sha256:" + "ef" * 32, "size": 9}
    for spec in METHOD_SPECS.values():
        if spec.produces_expert:
            with pytest.raises(ValidationError, match="output"):
                Manifest.model_validate(_manifest(spec.name))
            manifest = Manifest.model_validate(_manifest(spec.name, output=output))
            assert [r.id for r in manifest.refs()] == ["ex_new"]
        else:
            manifest = Manifest.model_validate(_manifest(spec.name))
            assert [r.id for r in manifest.refs()] == ["ex_a"]
            with pytest.raises(ValidationError, match="experts"):
                Manifest.model_validate(_manifest(spec.name, experts=[]))
        # Written as it was read: no with_base where the manifest did not say.
        assert manifest.as_json() == Manifest.model_validate(manifest.as_json()).as_json()
        assert "with_base" not in manifest.as_json()
        assert manifest.base_path() == (False, None)
    for bad in ({"format": "agora.composition/0"}, {"method": "soup"}, {"with_base": "yes"}):
        with pytest.raises(ValidationError):
            Manifest.model_validate({**_manifest("ensemble"), **bad})


def test_an_evaluation_subject_is_an_expert_or_a_composition_of_the_same_base() -> None:
    ref = {"id": "ex_a", "version": 1, "digest": DIGEST}
    good = {"base_revision": REVISION, "subject": {"kind": "expert", "expert": ref}}
    assert (
        EvaluatePayload.model_validate({**good, "text_sets": {"a": ["x"]}}).refs()[0].id == "ex_a"
    )
    for change in (
        {"subject": {"kind": "robot"}},
        {"text_sets": {}},
        {"text_sets": {"a": [""]}},
        {
            "subject": {
                "kind": "composition",
                "composition_id": "cmp_1",
                "manifest": _manifest("mixture", base_revision="ef" * 32),
            }
        },
    ):
        with pytest.raises(ValidationError):
            EvaluatePayload.model_validate({**good, "text_sets": {"a": ["x"]}, **change})
