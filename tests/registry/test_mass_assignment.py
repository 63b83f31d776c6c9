"""Mass assignment: a request body cannot set what the server decides: an owner, a status,
a role, an id, who made or resolved something (docs/governance.md, "Authorization").

Each write operation either refuses a field it does not take (multipart forms: 400
``unexpected_field``; reports, resolutions and tokens: 400 ``invalid_request``) or ignores
it (compositions, evaluations, moderation reasons, the worker's calls); in both cases what
is stored is what the server decided, and that is what these tests read back.
"""

from __future__ import annotations

import json
from typing import Any

from helpers.artifacts import make_datasheet
from sqlalchemy import func, select

from registry.db.models import Composition, Expert, ExpertReport, Job, Token

Api = Any  # tests/registry/conftest.py's Api: an app, its client, tokens and base model

# What a forger would like to set, everywhere.
FORGED = {
    "owner": "bob",
    "status": "active",
    "role": "admin",
    "id": "ex_forged",
    "created_by": "bob",
    "reporter": "bob",
    "expert_id": "ex_forged",
}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def count(api: Api, model: Any) -> int:
    with api.app.state.runtime.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def row(api: Api, model: Any, key: Any) -> Any:
    with api.app.state.runtime.sessions() as session:
        found = session.get(model, key)
        assert found is not None, (model, key)
        session.expunge(found)
        return found


def problem(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["code"] == code, response.text


def submit(api: Api, *, seed: int, token: str | None = None, **fields: str) -> Any:
    return api.client.post(
        "/v1/experts",
        files={
            "weights": ("expert.safetensors", api.expert_bytes(seed=seed)),
            "datasheet": ("DATASHEET.md", make_datasheet(name=f"expert {seed}")),
        },
        data={"base_revision": api.base.revision, **fields},
        headers=auth(token or api.tokens.alice),
    )


def test_an_expert_upload_cannot_set_its_owner_status_or_id(api: Api) -> None:
    for name in ("owner", "status", "id", "created_by", "latest_version", "digest"):
        problem(submit(api, seed=1, **{name: FORGED.get(name, "1")}), 400, "unexpected_field")
    assert api.leftovers().experts == 0
    assert api.leftovers().staging_files == []
    # Query parameters are no back door: the route reads none of them.
    made = api.client.post(
        "/v1/experts?owner=bob&status=disabled&id=ex_forged",
        files={
            "weights": ("expert.safetensors", api.expert_bytes(seed=2)),
            "datasheet": ("DATASHEET.md", make_datasheet()),
        },
        data={"base_revision": api.base.revision},
        headers=auth(api.tokens.alice),
    )
    assert made.status_code == 201, made.text
    expert = row(api, Expert, made.json()["id"])
    assert expert.id != "ex_forged"
    assert expert.owner == "alice"
    # The status the server gave (active, or quarantined while its arrival check runs).
    assert expert.status == made.json()["status"] != "disabled"
    # A new version of one's own expert: the same refusals, the expert unchanged.
    problem(submit(api, seed=3, expert_id=expert.id, owner="bob"), 400, "unexpected_field")
    assert row(api, Expert, expert.id).latest_version == 1
    # And bob cannot add a version to alice's expert by naming it.
    problem(submit(api, seed=4, token=api.tokens.bob, expert_id=expert.id), 403, "not_owner")
    again = row(api, Expert, expert.id)
    assert (again.owner, again.latest_version) == ("alice", 1)


def test_a_base_model_upload_takes_its_files_and_name_only(api: Api) -> None:
    files = api.base.files
    for name, value in [("revision", "0" * 64), ("owner", "bob"), ("id", "1")]:
        response = api.client.post(
            "/v1/base-models",
            files={
                "config": ("config.json", files["config.json"]),
                "tokenizer": ("tokenizer.json", files["tokenizer.json"]),
                "weights": ("model.safetensors", files["model.safetensors"]),
            },
            data={name: value},
            headers=auth(api.tokens.admin),
        )
        problem(response, 400, "unexpected_field")
    listed = api.client.get("/v1/base-models").json()["items"]
    assert [b["revision"] for b in listed] == [api.base.revision]


def test_reports_and_their_resolutions_refuse_the_servers_fields(api: Api) -> None:
    expert = submit(api, seed=1).json()["id"]
    url = f"/v1/experts/{expert}/reports"
    for name in ("reporter", "status", "id", "resolved_by", "moderation_action", "expert_id"):
        body = {"reason": "spam", name: FORGED.get(name, "bob")}
        problem(
            api.client.post(url, json=body, headers=auth(api.tokens.alice)), 400, "invalid_request"
        )
    assert count(api, ExpertReport) == 0
    filed = api.client.post(url, json={"reason": "spam"}, headers=auth(api.tokens.alice))
    assert filed.status_code == 201, filed.text
    report = row(api, ExpertReport, filed.json()["id"])
    assert (report.reporter, report.status, report.expert_id) == ("alice", "open", expert)
    resolve = f"/v1/reports/{report.id}/resolve"
    for name, value in [("status", "dismissed"), ("resolved_by", "bob"), ("reporter", "bob")]:
        body = {"resolution": "dismiss", name: value}
        response = api.client.post(resolve, json=body, headers=auth(api.tokens.moderator))
        problem(response, 400, "invalid_request")
    assert row(api, ExpertReport, report.id).status == "open"
    done = api.client.post(
        resolve, json={"resolution": "dismiss"}, headers=auth(api.tokens.moderator)
    )
    assert done.status_code == 200, done.text
    report = row(api, ExpertReport, report.id)
    assert (report.status, report.resolved_by, report.reporter) == (
        "dismissed",
        "moderator",
        "alice",
    )


def test_a_token_gets_the_role_an_admin_asked_for_and_nothing_else(api: Api) -> None:
    before = count(api, Token)
    # Only an admin makes tokens: a contributor cannot make itself an admin one.
    for who in ("alice", "moderator", "worker"):
        response = api.client.post(
            "/v1/tokens",
            json={"name": f"{who}-admin", "role": "admin"},
            headers=auth(getattr(api.tokens, who)),
        )
        problem(response, 403, "insufficient_role")
    for name, value in [
        ("id", 1),
        ("secret", "agora_chosen-by-the-caller"),
        ("prefix", "agora_x"),
        ("revoked_at", None),
        ("suspended_at", None),
        ("created_at", "2020-01-01T00:00:00Z"),
        ("owner", "bob"),
    ]:
        response = api.client.post(
            "/v1/tokens",
            json={"name": "dave", "role": "contributor", name: value},
            headers=auth(api.tokens.admin),
        )
        problem(response, 400, "invalid_request")
    assert count(api, Token) == before
    made = api.client.post(
        "/v1/tokens", json={"name": "dave", "role": "moderator"}, headers=auth(api.tokens.admin)
    )
    assert made.status_code == 201, made.text
    token = row(api, Token, made.json()["id"])
    assert (token.name, token.role, token.trusted) == ("dave", "moderator", False)
    assert token.revoked_at is None
    assert made.json()["secret"] != "agora_chosen-by-the-caller"
    # The role is the one asked for: dave moderates, and does not administer.
    dave = auth(made.json()["secret"])
    assert api.client.get("/v1/jobs", headers=dave).status_code == 200
    problem(api.client.get("/v1/tokens", headers=dave), 403, "insufficient_role")


def test_compositions_and_evaluations_ignore_the_servers_fields(api: Api) -> None:
    expert = submit(api, seed=1).json()["id"]
    forged = {
        **FORGED,
        "status": "ready",
        "job_id": "job_forged",
        "composition_id": "cmp_forged",
        "manifest": {"experts": []},
    }
    queued = api.client.post(
        "/v1/compositions",
        json={"method": "mixture", "experts": [expert], "base_revision": api.base.revision}
        | forged,
        headers=auth(api.tokens.bob),
    )
    assert queued.status_code == 202, queued.text
    composition = row(api, Composition, queued.json()["composition_id"])
    assert composition.id != "cmp_forged"
    assert composition.job_id == queued.json()["job_id"] != "job_forged"
    assert (composition.created_by, composition.status) == ("bob", "pending")
    assert composition.expert_id is None
    assert composition.manifest is None
    job = row(api, Job, composition.job_id)
    assert (job.created_by, job.status, job.attempts) == ("bob", "queued", 0)
    evaluation = api.client.post(
        "/v1/evaluations",
        json={"expert_id": expert, "text_sets": {"news": ["the tide"]}}
        # composition_id is one of its fields (the other subject), so not sent here.
        | {k: v for k, v in forged.items() if k != "composition_id"}
        | {"expert_id": expert, "attempts": 5, "result": {"bits_per_byte": 0}},
        headers=auth(api.tokens.bob),
    )
    assert evaluation.status_code == 202, evaluation.text
    job = row(api, Job, evaluation.json()["job_id"])
    assert job.id != "job_forged"
    assert (job.created_by, job.status, job.attempts, job.result) == ("bob", "queued", 0, None)


def test_moderation_bodies_cannot_choose_the_status_the_actor_or_the_expert(api: Api) -> None:
    mine = submit(api, seed=1).json()["id"]
    other = submit(api, seed=2).json()["id"]
    forged = {**FORGED, "status": "active", "actor": "bob", "expert_id": other, "action": "enable"}
    disabled = api.client.post(
        f"/v1/experts/{mine}/disable",
        json={"reason": "harmful"} | forged,
        headers=auth(api.tokens.moderator),
    )
    assert disabled.status_code == 200, disabled.text
    assert disabled.json()["action"] == "disable"
    assert disabled.json()["actor"] == "moderator"
    assert (row(api, Expert, mine).status, row(api, Expert, other).status) == (
        "disabled",
        "active",
    )
    withdrawn = api.client.post(
        f"/v1/experts/{other}/withdraw",
        json={"reason": "mine to take back"} | {**forged, "status": "disabled"},
        headers=auth(api.tokens.alice),
    )
    assert withdrawn.status_code == 200, withdrawn.text
    expert = row(api, Expert, other)
    assert (expert.status, expert.owner) == ("withdrawn", "alice")
    assert withdrawn.json()["actor"] == "alice"


def _average_job(api: Api) -> dict[str, Any]:
    """alice's average of two of her experts, leased by the worker."""
    a = submit(api, seed=1).json()["id"]
    b = submit(api, seed=2).json()["id"]
    queued = api.client.post(
        "/v1/compositions",
        json={"method": "average", "experts": [a, b], "base_revision": api.base.revision},
        headers=auth(api.tokens.alice),
    )
    assert queued.status_code == 202, queued.text
    forged = {"fencing_token": 999_999, "attempts": 0, "status": "succeeded", "token_id": 1}
    leased = api.client.post(
        "/v1/jobs/lease",
        json={"worker": "w1", "kinds": ["compose.average"]} | forged | FORGED,
        headers=auth(api.tokens.worker),
    )
    assert leased.status_code == 200, leased.text
    job: dict[str, Any] = leased.json()["job"]
    assert job["id"] == queued.json()["job_id"]
    stored = row(api, Job, job["id"])
    assert (stored.status, stored.attempts, stored.lease_owner) == ("leased", 1, "w1")
    assert stored.fencing_token == job["fencing_token"] != 999_999
    return job


def test_the_worker_cannot_set_the_jobs_state_nor_the_outputs_owner_or_id(api: Api) -> None:
    job = _average_job(api)
    beat = api.client.post(
        f"/v1/jobs/{job['id']}/heartbeat",
        json={
            "fencing_token": job["fencing_token"],
            "status": "succeeded",
            "lease_expires_at": "2099-01-01T00:00:00+00:00",
            "attempts": 0,
        },
        headers=auth(api.tokens.worker),
    )
    assert beat.status_code == 200, beat.text
    stored = row(api, Job, job["id"])
    assert (stored.status, stored.attempts) == ("leased", 1)
    assert stored.lease_expires_at.year < 2099
    complete = f"/v1/jobs/{job['id']}/complete"
    weights = {"weights": ("merged.safetensors", api.expert_bytes(seed=9))}
    fields = {"fencing_token": str(job["fencing_token"]), "result": json.dumps({})}
    # A form field the completion does not take is refused, and nothing is stored.
    for name in ("owner", "expert_id", "status"):
        response = api.client.post(
            complete,
            data={**fields, name: FORGED[name]},
            files=weights,
            headers=auth(api.tokens.worker),
        )
        problem(response, 400, "unexpected_field")
    assert row(api, Job, job["id"]).status == "leased"
    # The result's own fields do not name the output either: its owner is the job's
    # submitter, its id the registry's.
    result = {"owner": "worker", "expert_id": "ex_forged", "composition_id": "cmp_forged"}
    done = api.client.post(
        complete,
        data={**fields, "result": json.dumps(result | {"status": "active", "id": "ex_forged"})},
        files=weights,
        headers=auth(api.tokens.worker),
    )
    assert done.status_code == 200, done.text
    made = done.json()["result"]["expert_id"]
    assert made != "ex_forged"
    assert done.json()["result"]["composition_id"] == job["composition_id"]
    expert = row(api, Expert, made)
    assert expert.owner == "alice"
    assert count(api, Expert) == 3
    composition = row(api, Composition, job["composition_id"])
    assert (composition.expert_id, composition.created_by) == (made, "alice")


def test_a_result_cannot_claim_an_output_its_job_did_not_make(api: Api) -> None:
    """A mixture makes no expert: a result naming one is not stored as if it had."""
    expert = submit(api, seed=1).json()["id"]
    queued = api.client.post(
        "/v1/compositions",
        json={"method": "mixture", "experts": [expert], "base_revision": api.base.revision},
        headers=auth(api.tokens.alice),
    )
    assert queued.status_code == 202, queued.text
    leased = api.client.post(
        "/v1/jobs/lease",
        json={"worker": "w1", "kinds": ["compose.mixture"]},
        headers=auth(api.tokens.worker),
    )
    job = leased.json()["job"]
    done = api.client.post(
        f"/v1/jobs/{job['id']}/complete",
        json={
            "fencing_token": job["fencing_token"],
            "result": {"weights": [1.0], "expert_id": expert, "composition_id": "cmp_forged"},
        },
        headers=auth(api.tokens.worker),
    )
    assert done.status_code == 200, done.text
    result = done.json()["result"]
    assert "expert_id" not in result
    assert result["composition_id"] == job["composition_id"]
    assert row(api, Job, job["id"]).result.get("expert_id") is None
    assert row(api, Composition, job["composition_id"]).expert_id is None


def test_text_sets_and_schedules_refuse_the_servers_fields(api: Api) -> None:
    moderator = auth(api.tokens.moderator)
    text_set = {"name": "news", "date": "2026-12-01", "texts": ["the tide came in"]}
    for name, value in [("uploader", "bob"), ("id", 7), ("key", "news@2020-01-01")]:
        response = api.client.post(
            "/v1/text-sets", json=text_set | {name: value}, headers=moderator
        )
        problem(response, 400, "invalid_request")
    assert api.client.get("/v1/text-sets", headers=moderator).json()["items"] == []
    made = api.client.post("/v1/text-sets", json=text_set, headers=moderator)
    assert made.status_code == 201, made.text
    assert (made.json()["uploader"], made.json()["key"]) == ("moderator", "news@2026-12-01")
    for name, value in [("created_by", "bob"), ("cancelled_at", "2026-12-01T00:00:00Z"), ("id", 1)]:
        response = api.client.post(
            "/v1/monitoring/schedules", json={name: value}, headers=moderator
        )
        problem(response, 400, "invalid_request")
    assert api.client.get("/v1/monitoring/schedules", headers=moderator).json()["items"] == []
    scheduled = api.client.post("/v1/monitoring/schedules", json={}, headers=moderator)
    assert scheduled.status_code == 201, scheduled.text
    assert scheduled.json()["created_by"] == "moderator"
    assert scheduled.json()["cancelled_at"] is None


def test_an_idempotency_key_is_no_way_into_another_callers_answer(api: Api) -> None:
    """The same key from another token is another request: bob gets his own job, not
    alice's answer (the key is bound to its token: registry/services/idempotency.py)."""
    expert = submit(api, seed=1).json()["id"]
    body = {"method": "mixture", "experts": [expert], "base_revision": api.base.revision}
    answers = {}
    for who in ("alice", "bob", "alice"):
        response = api.client.post(
            "/v1/compositions",
            json=body,
            headers={**auth(getattr(api.tokens, who)), "Idempotency-Key": "shared-key-1"},
        )
        assert response.status_code == 202, response.text
        answers.setdefault(who, set()).add(response.json()["job_id"])
    assert len(answers["alice"]) == 1  # her retry: her first answer
    assert answers["alice"].isdisjoint(answers["bob"])
    (bobs,) = answers["bob"]
    assert row(api, Job, bobs).created_by == "bob"
