"""Jobs, compositions and evaluations through the HTTP API (no worker process: the test
plays the worker), on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

import pytest
from helpers.artifacts import make_datasheet
from sqlalchemy import func, select, update

from registry.db.models import Expert, ExpertParent, Job, JobResult
from registry.protocol import AVERAGE_CAUTION
from registry.settings import Settings

Api = Any


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def settings(database_url: str, tmp_path: Any) -> Settings:
    # Short backoff so retried jobs come back within a test.
    return Settings(
        data_dir=tmp_path / "agora",
        database_url=database_url,
        job_backoff_base_seconds=0.01,
        job_backoff_max_seconds=0.05,
        job_max_attempts=3,
    )


def submit_expert(api: Api, *, seed: int, name: str, license: str = "MIT") -> str:
    response = api.submit(
        weights=api.expert_bytes(seed=seed),
        datasheet=make_datasheet(name=name, license=license, samples=[f"{name} sample text"]),
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def compose(api: Api, body: dict[str, Any], token: str | None = None, **headers: str) -> Any:
    return api.client.post(
        "/v1/compositions",
        json={"base_revision": api.base.revision, **body},
        headers={**auth(token or api.tokens.alice), **headers},
    )


def lease(api: Api, **body: Any) -> Any:
    return api.client.post(
        "/v1/jobs/lease",
        json={"worker": "test-worker", **body},
        headers=auth(api.tokens.worker),
    )


def worker_post(api: Api, path: str, body: dict[str, Any]) -> Any:
    return api.client.post(path, json=body, headers=auth(api.tokens.worker))


def expire_lease(api: Api, job_id: str) -> None:
    runtime = api.app.state.runtime
    with runtime.sessions() as session, session.begin():
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(lease_expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
        )


def problem(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == code


def test_empty_queue_answers_204_and_only_workers_lease(api: Api) -> None:
    assert lease(api).status_code == 204
    response = api.client.post(
        "/v1/jobs/lease", json={"worker": "x"}, headers=auth(api.tokens.alice)
    )
    problem(response, 403, "insufficient_role")
    problem(lease(api, kinds=["nope"]), 400, "invalid_kinds")
    problem(lease(api, lease_seconds=1), 400, "invalid_lease_seconds")


def test_mixture_composition_round_trip(api: Api) -> None:
    a = submit_expert(api, seed=1, name="alpha")
    b = submit_expert(api, seed=2, name="beta")
    response = compose(api, {"method": "mixture", "experts": [a, f"{b}@1"]})
    assert response.status_code == 202, response.text
    queued = response.json()
    assert queued["status"] == "queued"

    leased = lease(api, kinds=["compose.mixture"]).json()["job"]
    assert leased["id"] == queued["job_id"]
    assert leased["attempts"] == 1
    token = leased["fencing_token"]
    assert isinstance(token, int)
    assert 0 < token < 2**53
    payload = leased["payload"]
    assert [e["id"] for e in payload["experts"]] == [a, b]
    assert all(e["digest"].startswith("sha256:") for e in payload["experts"])
    # Without texts, the experts' datasheet samples are the text the worker works on.
    assert payload["texts"] == ["alpha sample text", "beta sample text"]
    assert lease(api).status_code == 204  # nothing else runnable

    job_id = leased["id"]
    beat = worker_post(
        api, f"/v1/jobs/{job_id}/heartbeat", {"fencing_token": token, "progress": {"done": 1}}
    )
    assert beat.status_code == 200, beat.text
    # The submitter sees progress; another contributor may not read the job.
    seen = api.client.get(f"/v1/jobs/{job_id}", headers=auth(api.tokens.alice)).json()
    assert seen["status"] == "leased"
    assert seen["progress"] == {"done": 1}
    assert seen["fencing_token"] is None
    problem(api.client.get(f"/v1/jobs/{job_id}", headers=auth(api.tokens.bob)), 403, "not_owner")

    result = {"weights": None, "metrics": {"bits_per_byte": 1.5, "base_bits_per_byte": 2.0}}
    done = worker_post(
        api, f"/v1/jobs/{job_id}/complete", {"fencing_token": token, "result": result}
    )
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "succeeded"
    # A retried completion (the response was lost) is answered the same, applied once.
    again = worker_post(
        api, f"/v1/jobs/{job_id}/complete", {"fencing_token": token, "result": result}
    )
    assert again.status_code == 200
    assert again.json()["status"] == "succeeded"

    composition = api.client.get(f"/v1/compositions/{queued['composition_id']}").json()
    assert composition["status"] == "ready"
    manifest = composition["manifest"]
    assert manifest["format"] == "agora.composition/1"
    assert manifest["method"] == "mixture"
    assert manifest["base_revision"] == api.base.revision
    assert [e["id"] for e in manifest["experts"]] == [a, b]
    assert manifest["metrics"]["bits_per_byte"] == 1.5
    runtime = api.app.state.runtime
    with runtime.sessions() as session:
        assert session.scalar(select(func.count()).select_from(JobResult)) == 1


def test_stale_worker_cannot_heartbeat_complete_or_fail(api: Api) -> None:
    a = submit_expert(api, seed=1, name="alpha")
    job_id = compose(api, {"method": "ensemble", "experts": [a]}).json()["job_id"]
    first = lease(api).json()["job"]
    expire_lease(api, job_id)
    second = lease(api).json()["job"]
    assert second["id"] == job_id
    assert second["attempts"] == 2
    assert second["fencing_token"] != first["fencing_token"]
    stale = {"fencing_token": first["fencing_token"]}
    problem(worker_post(api, f"/v1/jobs/{job_id}/heartbeat", stale), 409, "lease_lost")
    problem(
        worker_post(api, f"/v1/jobs/{job_id}/complete", {**stale, "result": {"weights": [1.0]}}),
        409,
        "lease_lost",
    )
    problem(worker_post(api, f"/v1/jobs/{job_id}/fail", {**stale, "error": "x"}), 409, "lease_lost")
    ok = worker_post(
        api,
        f"/v1/jobs/{job_id}/complete",
        {"fencing_token": second["fencing_token"], "result": {"weights": [1.0]}},
    )
    assert ok.status_code == 200, ok.text
    composition = api.client.get(f"/v1/compositions/{ok.json()['composition_id']}").json()
    assert composition["manifest"]["experts"][0]["weight"] == 1.0


def test_retries_back_off_then_the_job_is_dead_and_visible(api: Api) -> None:
    a = submit_expert(api, seed=1, name="alpha")
    poison = compose(api, {"method": "mixture", "experts": [a]}).json()["job_id"]
    for attempt in range(1, 4):
        job = None
        for _ in range(100):  # the backoff is at most 50 ms here
            response = lease(api)
            if response.status_code == 200:
                job = response.json()["job"]
                break
            time.sleep(0.01)
        assert job is not None
        assert job["id"] == poison
        assert job["attempts"] == attempt
        failed = worker_post(
            api, f"/v1/jobs/{poison}/fail", {"fencing_token": job["fencing_token"], "error": "boom"}
        ).json()
        assert failed["status"] == ("dead" if attempt == 3 else "queued")
    assert failed["error"] == "boom"
    assert failed["finished_at"] is not None
    dead = api.client.get("/v1/jobs?status=dead", headers=auth(api.tokens.moderator)).json()
    assert [j["id"] for j in dead["items"]] == [poison]
    composition = api.client.get(f"/v1/compositions/{failed['composition_id']}").json()
    assert composition["status"] == "failed"
    time.sleep(0.06)
    assert lease(api).status_code == 204


def test_expired_last_lease_makes_the_job_dead(api: Api) -> None:
    a = submit_expert(api, seed=1, name="alpha")
    job_id = compose(api, {"method": "mixture", "experts": [a]}).json()["job_id"]
    for _ in range(3):
        assert lease(api).json()["job"]["id"] == job_id
        expire_lease(api, job_id)
    assert lease(api).status_code == 204
    job = api.client.get(f"/v1/jobs/{job_id}", headers=auth(api.tokens.admin)).json()
    assert job["status"] == "dead"
    assert "expired" in job["error"]


def test_permanent_failure_and_release(api: Api) -> None:
    a = submit_expert(api, seed=1, name="alpha")
    first = compose(api, {"method": "mixture", "experts": [a]}).json()["job_id"]
    job = lease(api).json()["job"]
    released = worker_post(
        api, f"/v1/jobs/{first}/fail", {"fencing_token": job["fencing_token"], "release": True}
    ).json()
    assert released["status"] == "queued"
    assert released["attempts"] == 0
    job = lease(api).json()["job"]
    assert job["attempts"] == 1
    failed = worker_post(
        api,
        f"/v1/jobs/{first}/fail",
        {"fencing_token": job["fencing_token"], "error": "bad input", "retryable": False},
    ).json()
    assert failed["status"] == "failed"
    assert lease(api).status_code == 204


def test_refusals_create_no_job(api: Api) -> None:
    a = submit_expert(api, seed=1, name="alpha")
    disabled = submit_expert(api, seed=2, name="gamma")
    response = api.client.post(
        f"/v1/experts/{disabled}/disable",
        json={"reason": "test"},
        headers=auth(api.tokens.moderator),
    )
    assert response.status_code == 200, response.text
    problem(compose(api, {"method": "mixture", "experts": [a, disabled]}), 451, "expert_disabled")
    problem(compose(api, {"method": "mixture", "experts": ["ex_nothere"]}), 404, "expert_not_found")
    problem(compose(api, {"method": "mixture", "experts": [f"{a}@7"]}), 404, "version_not_found")
    problem(compose(api, {"method": "blend", "experts": [a]}), 400, "invalid_method")
    problem(compose(api, {"method": "average", "experts": [a]}), 400, "too_few_experts")
    problem(
        compose(api, {"method": "distill", "experts": [a], "params": {"steps": 0}}),
        400,
        "invalid_params",
    )
    problem(compose(api, {"method": "mixture"}), 400, "missing_experts")
    problem(
        compose(api, {"method": "mixture", "experts": [a], "base_revision": "0" * 64}),
        404,
        "base_model_not_found",
    )
    problem(
        compose(api, {"method": "ensemble", "experts": [a], "weights": [-1]}),
        400,
        "invalid_weights",
    )
    # The base path's parameters: a bool, and a positive weight that needs the experts'.
    for params, weights in [
        ({"with_base": "yes"}, None),
        ({"with_base": 1}, None),
        ({"with_base": None}, None),
        ({"base_weight": 0}, [1.0]),
        ({"base_weight": -1.0}, [1.0]),
        ({"base_weight": True}, [1.0]),
        ({"base_weight": "1"}, [1.0]),
        ({"with_base": False, "base_weight": 1.0}, [1.0]),
        ({"base_weight": 1.0}, None),
    ]:
        body = {"method": "ensemble", "experts": [a], "params": params, "weights": weights}
        problem(compose(api, body), 400, "invalid_params")
    problem(
        compose(api, {"method": "mixture", "experts": [a], "params": {"with_base": False}}),
        400,
        "invalid_params",
    )
    assert api.client.post("/v1/compositions", json={}).status_code == 401
    runtime = api.app.state.runtime
    with runtime.sessions() as session:
        # The disable queued its forgetting measurement (docs/governance.md); no other job.
        kinds = [j.payload.get("purpose") for j in session.scalars(select(Job))]
        assert kinds == ["forgetting"]


def complete(api: Api, job: dict[str, Any], result: dict[str, Any]) -> Any:
    return worker_post(
        api,
        f"/v1/jobs/{job['id']}/complete",
        {"fencing_token": job["fencing_token"], "result": result},
    )


def test_ensemble_has_the_base_as_a_path_by_default_and_its_manifest_says_so(api: Api) -> None:
    a = submit_expert(api, seed=1, name="alpha")
    b = submit_expert(api, seed=2, name="beta")
    queued = compose(api, {"method": "ensemble", "experts": [a, b]}).json()
    job = lease(api).json()["job"]
    assert job["payload"]["params"] == {"prior_windows": 8, "with_base": True}
    # A result that contradicts the request, or gives base_weight without the experts'
    # weights, is refused and changes nothing.
    problem(complete(api, job, {"weights": [0.5, 0.5], "with_base": False}), 422, "invalid_result")
    problem(complete(api, job, {"base_weight": 0.5}), 422, "invalid_result")
    problem(complete(api, job, {"weights": [0.5, 0.5], "base_weight": -0.1}), 422, "invalid_result")
    pending = api.client.get(f"/v1/compositions/{queued['composition_id']}").json()
    assert pending["status"] == "pending"
    result = {"weights": [0.375, 0.125], "base_weight": 0.5, "with_base": True}
    assert complete(api, job, result).status_code == 200
    composition = api.client.get(f"/v1/compositions/{queued['composition_id']}").json()
    manifest = composition["manifest"]
    assert manifest["with_base"] is True
    assert manifest["base_weight"] == 0.5
    assert [e["weight"] for e in manifest["experts"]] == [0.375, 0.125]
    assert composition["params"]["with_base"] is True


def test_ensemble_without_base_and_with_a_base_weight(api: Api) -> None:
    a = submit_expert(api, seed=1, name="alpha")
    b = submit_expert(api, seed=2, name="beta")
    params = {"with_base": False}
    queued = compose(api, {"method": "ensemble", "experts": [a, b], "params": params}).json()
    job = lease(api).json()["job"]
    assert job["payload"]["params"]["with_base"] is False
    problem(
        complete(api, job, {"weights": [0.5, 0.25], "base_weight": 0.25}), 422, "invalid_result"
    )
    assert complete(api, job, {"weights": [0.5, 0.5], "with_base": False}).status_code == 200
    manifest = api.client.get(f"/v1/compositions/{queued['composition_id']}").json()["manifest"]
    assert manifest["with_base"] is False
    assert "base_weight" not in manifest

    # base_weight is on the scale of the weights: normalised with them (3 : 1 : 2).
    body = {
        "method": "ensemble",
        "experts": [a, b],
        "weights": [3, 1],
        "params": {"base_weight": 2},
    }
    assert compose(api, body).status_code == 202
    job = lease(api).json()["job"]
    assert job["payload"]["weights"] == [0.75, 0.25]
    assert job["payload"]["params"] == {"prior_windows": 8, "with_base": True, "base_weight": 0.5}


def test_other_methods_have_no_base_path(api: Api) -> None:
    a = submit_expert(api, seed=1, name="alpha")
    queued = compose(api, {"method": "mixture", "experts": [a]}).json()
    job = lease(api).json()["job"]
    assert job["payload"]["params"] == {}
    problem(complete(api, job, {"with_base": True}), 422, "invalid_result")
    assert complete(api, job, {"with_base": False}).status_code == 200
    manifest = api.client.get(f"/v1/compositions/{queued['composition_id']}").json()["manifest"]
    assert "with_base" not in manifest


def test_openapi_describes_the_base_path_parameters(api: Api) -> None:
    schema = api.client.get("/openapi.json").json()["components"]["schemas"]["CompositionIn"]
    described = schema["properties"]["params"]["description"]
    assert "with_base (bool, default true)" in described
    assert "base_weight (number > 0, optional)" in described
    assert "prior_windows" in described


def test_idempotency_key_returns_the_same_job(api: Api) -> None:
    a = submit_expert(api, seed=1, name="alpha")
    body = {"method": "mixture", "experts": [a]}
    first = compose(api, body, **{"Idempotency-Key": "k1"})
    second = compose(api, body, **{"Idempotency-Key": "k1"})
    assert first.status_code == second.status_code == 202
    assert first.json() == second.json()
    problem(
        compose(api, {**body, "method": "ensemble"}, **{"Idempotency-Key": "k1"}),
        409,
        "idempotency_key_reused",
    )


def test_average_is_answered_with_a_caution_and_ensemble_with_none(api: Api) -> None:
    a = submit_expert(api, seed=1, name="alpha")
    b = submit_expert(api, seed=2, name="beta")
    caution = {"code": "average_may_harm", "detail": AVERAGE_CAUTION.detail}
    averaged = compose(api, {"method": "average", "experts": [a, b]})
    assert averaged.status_code == 202, averaged.text
    assert averaged.json()["warnings"] == [caution]
    assert "+3.7%" in caution["detail"]
    assert "Prefer ensemble" in caution["detail"]
    ensembled = compose(api, {"method": "ensemble", "experts": [a, b]})
    assert ensembled.status_code == 202, ensembled.text
    assert ensembled.json()["warnings"] == []
    # The composition says so too, pending or ready: derived from its method.
    seen = api.client.get(f"/v1/compositions/{averaged.json()['composition_id']}").json()
    assert seen["warnings"] == [caution]
    seen = api.client.get(f"/v1/compositions/{ensembled.json()['composition_id']}").json()
    assert seen["warnings"] == []


def test_average_weights_given_are_weights_used(api: Api) -> None:
    a = submit_expert(api, seed=1, name="alpha")
    b = submit_expert(api, seed=2, name="beta")
    # Weights and no merge named: a weighted average with exactly those weights.
    queued = compose(api, {"method": "average", "experts": [a, b], "weights": [0.7, 0.3]})
    assert queued.status_code == 202, queued.text
    payload = lease(api).json()["job"]["payload"]
    assert payload["params"]["merge"] == "weighted"
    assert payload["weights"] == pytest.approx([0.7, 0.3])
    # A uniform average would ignore them: refused, and no job is queued.
    body = {"method": "average", "experts": [a, b], "weights": [0.7, 0.3]}
    refused = compose(api, {**body, "params": {"merge": "uniform"}})
    problem(refused, 400, "invalid_weights")
    assert "merge" in refused.json()["detail"]
    assert lease(api).status_code == 204
    # A uniform average records no weights.
    assert compose(api, {"method": "average", "experts": [a, b]}).status_code == 202
    payload = lease(api).json()["job"]["payload"]
    assert payload["params"]["merge"] == "uniform"
    assert payload["weights"] is None


def test_a_replayed_average_request_repeats_its_caution(api: Api) -> None:
    a = submit_expert(api, seed=1, name="alpha")
    b = submit_expert(api, seed=2, name="beta")
    body = {"method": "average", "experts": [a, b], "params": {"merge": "ties"}}
    first = compose(api, body, **{"Idempotency-Key": "avg-1"})
    second = compose(api, body, **{"Idempotency-Key": "avg-1"})
    assert first.status_code == second.status_code == 202, second.text
    assert second.json() == first.json()
    assert [w["code"] for w in second.json()["warnings"]] == ["average_may_harm"]
    assert lease(api).status_code == 200
    assert lease(api).status_code == 204  # one job, however often it was asked for


def test_openapi_documents_the_warnings_of_a_composition_request(api: Api) -> None:
    spec = api.client.get("/openapi.json").json()
    answer = spec["paths"]["/v1/compositions"]["post"]["responses"]["202"]
    ref = answer["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    warnings = spec["components"]["schemas"][ref]["properties"]["warnings"]
    assert "average_may_harm" in warnings["description"]
    item = warnings["items"]["$ref"].rsplit("/", 1)[1]
    assert set(spec["components"]["schemas"][item]["properties"]) == {"code", "detail"}


def test_composition_by_texts_uses_retrieval(api: Api) -> None:
    a = submit_expert(api, seed=1, name="tide pools and sea stars")
    submit_expert(api, seed=2, name="compilers and parsers")
    response = compose(
        api, {"method": "ensemble", "texts": ["sea stars in the tide pools"], "k": 1}
    )
    assert response.status_code == 202, response.text
    job = lease(api).json()["job"]
    assert [e["id"] for e in job["payload"]["experts"]] == [a]
    assert job["payload"]["weights"] == [1.0]
    assert job["payload"]["texts"] == ["sea stars in the tide pools"]


def test_average_completion_stores_a_new_expert_with_lineage(api: Api) -> None:
    a = submit_expert(api, seed=1, name="alpha", license="MIT")
    b = submit_expert(api, seed=2, name="beta", license="CC-BY-4.0")
    queued = compose(
        api,
        {
            "method": "average",
            "experts": [a, b],
            "weights": [3, 1],
            "params": {"merge": "weighted"},
        },
    ).json()
    job = lease(api).json()["job"]
    token = job["fencing_token"]
    missing = worker_post(
        api, f"/v1/jobs/{job['id']}/complete", {"fencing_token": token, "result": {}}
    )
    problem(missing, 422, "missing_output")
    merged = api.expert_bytes(seed=3)
    done = api.client.post(
        f"/v1/jobs/{job['id']}/complete",
        data={"fencing_token": str(token), "result": json.dumps({"weights": [0.75, 0.25]})},
        files={"weights": ("merged.safetensors", merged)},
        headers=auth(api.tokens.worker),
    )
    assert done.status_code == 200, done.text
    new_id = done.json()["result"]["expert_id"]
    expert = api.client.get(f"/v1/experts/{new_id}").json()
    assert expert["owner"] == "alice"
    assert expert["license"] == "CC-BY-4.0 AND MIT"
    sheet = api.client.get(f"/v1/experts/{new_id}/datasheet").text
    assert f"expert_id: {a}" in sheet
    assert f"expert_id: {b}" in sheet
    weights = api.client.get(f"/v1/experts/{new_id}/weights")
    assert weights.content == merged
    manifest = api.client.get(f"/v1/compositions/{queued['composition_id']}").json()["manifest"]
    assert manifest["output"]["id"] == new_id
    assert [e["weight"] for e in manifest["experts"]] == [0.75, 0.25]
    runtime = api.app.state.runtime
    with runtime.sessions() as session:
        parents = session.scalars(
            select(ExpertParent).where(ExpertParent.expert_id == new_id)
        ).all()
        assert sorted(p.parent_id for p in parents) == sorted([a, b])
    # Withdrawing a parent withdraws the composition that used it.
    api.client.post(
        f"/v1/experts/{a}/disable", json={"reason": "r"}, headers=auth(api.tokens.moderator)
    )
    problem(api.client.get(f"/v1/compositions/{queued['composition_id']}"), 451, "expert_disabled")


def test_invalid_output_weights_are_refused_and_nothing_is_stored(api: Api) -> None:
    a = submit_expert(api, seed=1, name="alpha")
    b = submit_expert(api, seed=2, name="beta")
    compose(api, {"method": "average", "experts": [a, b]})
    job = lease(api).json()["job"]
    before = api.leftovers()
    response = api.client.post(
        f"/v1/jobs/{job['id']}/complete",
        data={"fencing_token": str(job["fencing_token"]), "result": "{}"},
        files={"weights": ("merged.safetensors", b"not a safetensors file at all")},
        headers=auth(api.tokens.worker),
    )
    assert 400 <= response.status_code < 500, response.text
    after = api.leftovers()
    assert (after.experts, after.blob_rows, after.staging_files) == (
        before.experts,
        before.blob_rows,
        [],
    )
    runtime = api.app.state.runtime
    with runtime.sessions() as session:
        assert session.get(Job, job["id"]).status == "leased"  # type: ignore[union-attr]
        assert session.scalar(select(func.count()).select_from(Expert)) == 2


def test_evaluation_job_results_are_listed_per_expert(api: Api) -> None:
    a = submit_expert(api, seed=1, name="alpha")
    response = api.client.post(
        "/v1/evaluations",
        json={"expert_id": a, "text_sets": {"news": ["some text"], "code": ["def f(): pass"]}},
        headers=auth(api.tokens.alice),
    )
    assert response.status_code == 202, response.text
    job = lease(api, kinds=["evaluate"]).json()["job"]
    assert job["payload"]["subject"]["expert"]["id"] == a
    bad = {"results": {"news": {"bits_per_byte": 1.0, "tokens": 3, "bytes": 9}}}
    problem(
        worker_post(
            api,
            f"/v1/jobs/{job['id']}/complete",
            {"fencing_token": job["fencing_token"], "result": bad},
        ),
        422,
        "invalid_result",
    )
    score = {"bits_per_byte": 1.0, "tokens": 3, "bytes": 9}
    for wrong in ({"bits_per_byte": -1.0}, {"tokens": 2.5}, {"delta_vs_base": "worse"}):
        bad = {"results": {"news": {**score, **wrong}, "code": score}}
        problem(complete(api, job, bad), 422, "invalid_result")
    good = {
        "results": {
            "news": {"bits_per_byte": 1.25, "base_bits_per_byte": 1.5, "tokens": 3, "bytes": 9},
            "code": {"bits_per_byte": 2.0, "base_bits_per_byte": 2.5, "tokens": 5, "bytes": 13},
        }
    }
    done = worker_post(
        api,
        f"/v1/jobs/{job['id']}/complete",
        {"fencing_token": job["fencing_token"], "result": good},
    )
    assert done.status_code == 200, done.text
    items = api.client.get(f"/v1/experts/{a}/evaluations").json()["items"]
    assert {i["text_set"]: i["bits_per_byte"] for i in items} == {"news": 1.25, "code": 2.0}
    # The change against the base, relative: (1.25 - 1.5) / 1.5, (2.0 - 2.5) / 2.5.
    deltas = {i["text_set"]: i["delta_vs_base"] for i in items}
    assert deltas == pytest.approx({"news": -1 / 6, "code": -0.2})
    problem(
        api.client.post(
            "/v1/evaluations",
            json={"expert_id": a, "composition_id": "cmp_x", "text_sets": {"a": ["b"]}},
            headers=auth(api.tokens.alice),
        ),
        400,
        "invalid_subject",
    )


# -- defect 4: fencing tokens are secrets of the lease holder ------------------------------


def another_worker(api: Api, name: str = "other-worker", role: str = "worker") -> str:
    from registry.services.tokens import create_token

    with api.app.state.runtime.sessions() as session, session.begin():
        _, secret = create_token(session=session, name=name, role=role)
    return secret


def current_fencing_token(api: Api, job_id: str) -> int:
    with api.app.state.runtime.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.fencing_token


def test_the_fencing_token_is_shown_to_the_lease_holder_only(api: Api) -> None:
    a = submit_expert(api, seed=1, name="alpha")
    queued = compose(api, {"method": "mixture", "experts": [a]}).json()
    job = lease(api).json()["job"]
    token = job["fencing_token"]
    assert token == current_fencing_token(api, job["id"])
    other = another_worker(api)
    path = f"/v1/jobs/{job['id']}"
    assert api.client.get(path, headers=auth(api.tokens.worker)).json()["fencing_token"] == token
    for reader in (other, api.tokens.admin, api.tokens.moderator, api.tokens.alice):
        seen = api.client.get(path, headers=auth(reader)).json()
        assert seen["status"] == "leased"
        assert seen["fencing_token"] is None
    for lister in (api.tokens.admin, api.tokens.moderator):
        items = api.client.get("/v1/jobs", headers=auth(lister)).json()["items"]
        assert [i["id"] for i in items] == [queued["job_id"]]
        assert items[0]["fencing_token"] is None
    # Once the lease is over the token is nobody's to see.
    assert complete(api, job, {"weights": [1.0]}).json()["fencing_token"] is None
    assert api.client.get(path, headers=auth(api.tokens.worker)).json()["fencing_token"] is None


def test_a_worker_cannot_act_on_a_job_another_worker_holds(api: Api) -> None:
    a = submit_expert(api, seed=1, name="alpha")
    queued = compose(api, {"method": "mixture", "experts": [a]}).json()
    job = lease(api).json()["job"]
    stolen = current_fencing_token(api, job["id"])  # as if read from the database
    for secret in (another_worker(api), api.tokens.admin):
        for action, body in [
            ("heartbeat", {"fencing_token": stolen}),
            ("fail", {"fencing_token": stolen, "error": "x", "retryable": False}),
            ("fail", {"fencing_token": stolen, "release": True}),
            ("complete", {"fencing_token": stolen, "result": {"weights": [1.0]}}),
        ]:
            response = api.client.post(
                f"/v1/jobs/{job['id']}/{action}", json=body, headers=auth(secret)
            )
            problem(response, 403, "not_lease_holder")
            assert str(stolen) not in response.text
    seen = api.client.get(f"/v1/jobs/{job['id']}", headers=auth(api.tokens.worker)).json()
    assert (seen["status"], seen["attempts"], seen["fencing_token"]) == ("leased", 1, stolen)
    pending = api.client.get(f"/v1/compositions/{queued['composition_id']}").json()
    assert pending["status"] == "pending"
    # The holder completes; the same completion from another token is no replay.
    done = complete(api, job, {"weights": [1.0]})
    assert done.status_code == 200, done.text
    problem(
        api.client.post(
            f"/v1/jobs/{job['id']}/complete",
            json={"fencing_token": stolen, "result": {"weights": [1.0]}},
            headers=auth(another_worker(api, "third-worker")),
        ),
        403,
        "not_lease_holder",
    )


def test_a_lost_lease_error_does_not_reveal_the_current_token(api: Api) -> None:
    a = submit_expert(api, seed=1, name="alpha")
    job_id = compose(api, {"method": "mixture", "experts": [a]}).json()["job_id"]
    first = lease(api).json()["job"]
    expire_lease(api, job_id)
    second = lease(api).json()["job"]
    for action in ("heartbeat", "fail", "complete"):
        body = {"fencing_token": first["fencing_token"], "result": {"weights": [1.0]}}
        response = worker_post(api, f"/v1/jobs/{job_id}/{action}", body)
        problem(response, 409, "lease_lost")
        assert str(second["fencing_token"]) not in response.text


def test_an_accepted_completion_resets_the_refusal_count(api: Api) -> None:
    from registry.db.models import Token

    def refusals() -> int:
        with api.app.state.runtime.sessions() as session:
            row = session.scalars(select(Token).where(Token.name == "worker")).one()
            return row.refusals

    threshold = api.app.state.runtime.settings.worker_suspend_after_refusals
    a = submit_expert(api, seed=1, name="alpha")
    for _ in range(2):
        compose(api, {"method": "mixture", "experts": [a]})
        job = lease(api).json()["job"]
        for expected in range(1, threshold):
            problem(complete(api, job, {"with_base": True}), 422, "invalid_result")
            assert refusals() == expected
        assert complete(api, job, {"weights": [1.0]}).status_code == 200
        assert refusals() == 0
    assert lease(api).status_code == 204  # never suspended: 2 x (threshold - 1) refusals
