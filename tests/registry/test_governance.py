"""Governance through the HTTP API, on SQLite and PostgreSQL: what a disable or an
owner's withdrawal reaches (descendants, search, downloads, compositions, jobs), what a
re-enable restores, and a disabled digest refused when uploaded again
(docs/governance.md, "States"). The test plays the worker, as tests/registry/test_jobs.py
does."""

from __future__ import annotations

import json
from typing import Any

from helpers.artifacts import make_datasheet
from sqlalchemy import func, select

from registry.db.models import AuditEvent, Expert, Job, JobResult

Api = Any


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def submit(api: Api, *, seed: int, name: str, token: str | None = None) -> str:
    response = api.submit(
        token,
        weights=api.expert_bytes(seed=seed),
        datasheet=make_datasheet(name=name, samples=[f"{name} sample text"]),
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def request_average(api: Api, parents: list[str]) -> dict[str, Any]:
    response = api.client.post(
        "/v1/compositions",
        json={"base_revision": api.base.revision, "method": "average", "experts": parents},
        headers=auth(api.tokens.alice),
    )
    assert response.status_code in (200, 201, 202), response.text
    return dict(response.json())


def lease(api: Api) -> Any:
    return api.client.post(
        "/v1/jobs/lease", json={"worker": "test-worker"}, headers=auth(api.tokens.worker)
    )


def complete_with(api: Api, job: dict[str, Any], *, seed: int) -> Any:
    return api.client.post(
        f"/v1/jobs/{job['id']}/complete",
        data={"fencing_token": str(job["fencing_token"]), "result": json.dumps({})},
        files={"weights": ("merged.safetensors", api.expert_bytes(seed=seed))},
        headers=auth(api.tokens.worker),
    )


def derive(api: Api, parents: list[str], *, seed: int) -> str:
    """An average of ``parents``, made through the job queue: its lineage is real."""
    request_average(api, parents)
    job = lease(api).json()["job"]
    done = complete_with(api, job, seed=seed)
    assert done.status_code == 200, done.text
    return str(done.json()["result"]["expert_id"])


def status(api: Api, expert_id: str) -> tuple[str, str | None]:
    with api.app.state.runtime.sessions() as session:
        expert = session.get(Expert, expert_id)
        assert expert is not None
        return expert.status, expert.withdrawn_cause


def moderate(api: Api, expert_id: str, action: str, reason: str = "r") -> Any:
    return api.client.post(
        f"/v1/experts/{expert_id}/{action}",
        json={"reason": reason},
        headers=auth(api.tokens.moderator),
    )


def owner(api: Api, expert_id: str, action: str, token: str | None = None) -> Any:
    return api.client.post(
        f"/v1/experts/{expert_id}/{action}",
        json={"reason": "my data"},
        headers=auth(token or api.tokens.alice),
    )


def listed(api: Api) -> set[str]:
    body = api.client.get("/v1/experts", params={"limit": 100}).json()
    return {e["id"] for e in body["items"]}


def audit_actions(api: Api) -> list[tuple[str, str, str]]:
    with api.app.state.runtime.sessions() as session:
        rows = session.scalars(select(AuditEvent).order_by(AuditEvent.seq)).all()
        return [(r.actor, r.action, r.target) for r in rows]


def problem(response: Any, status_code: int, code: str) -> dict[str, Any]:
    assert response.status_code == status_code, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = dict(response.json())
    assert body["code"] == code, body
    return body


def test_a_disable_withdraws_two_generations_and_a_re_enable_restores_them(api: Api) -> None:
    a = submit(api, seed=1, name="alpha")
    b = submit(api, seed=2, name="beta")
    c = submit(api, seed=4, name="gamma")
    d = derive(api, [a, b], seed=3)  # a, b -> d
    e = derive(api, [d, c], seed=5)  # d, c -> e: a's grandchild
    assert {a, b, c, d, e} <= listed(api)

    assert moderate(api, a, "disable", "licence revoked").status_code == 200
    assert status(api, d) == ("withdrawn_by_lineage", a)
    assert status(api, e) == ("withdrawn_by_lineage", a)
    assert status(api, b) == ("active", None)
    assert {d, e, a} & listed(api) == set()
    # Downloads name the cause, for everyone but moderators.
    for path in (f"/v1/experts/{e}/weights", f"/v1/experts/{e}/datasheet"):
        body = problem(api.client.get(path), 451, "expert_disabled")
        assert body["cause"] == {"expert_id": a, "status": "disabled"}
        assert a in body["detail"]
        problem(api.client.get(path, headers=auth(api.tokens.bob)), 451, "expert_disabled")
    review = api.client.get(f"/v1/experts/{e}/weights", headers=auth(api.tokens.moderator))
    assert review.status_code == 200
    assert review.content == api.expert_bytes(seed=5)
    assert ("moderator", "expert.review_download", f"expert:{e}") in audit_actions(api)
    # Compositions using a withdrawn descendant answer 451 with the cause.
    refused = api.client.post(
        "/v1/compositions",
        json={"base_revision": api.base.revision, "method": "average", "experts": [e, b]},
        headers=auth(api.tokens.alice),
    )
    assert problem(refused, 451, "expert_disabled")["cause"] == {
        "expert_id": a,
        "status": "disabled",
    }
    lineage = api.client.get(f"/v1/experts/{d}/lineage").json()
    assert lineage["status"] == "withdrawn_by_lineage"
    assert lineage["withdrawn_cause"] == a
    assert {(p["id"], p["status"]) for p in lineage["parents"]} == {
        (a, "disabled"),
        (b, "active"),
    }
    assert [(k["id"], k["status"]) for k in lineage["children"]] == [(e, "withdrawn_by_lineage")]

    # A second disabled ancestor: re-enabling the first leaves e withdrawn, by c now.
    assert moderate(api, c, "disable").status_code == 200
    assert status(api, e) == ("withdrawn_by_lineage", a)
    assert moderate(api, a, "enable", "appeal upheld").status_code == 200
    assert status(api, d) == ("active", None)
    assert status(api, e) == ("withdrawn_by_lineage", c)
    problem(api.client.get(f"/v1/experts/{e}/weights"), 451, "expert_disabled")
    assert moderate(api, c, "enable").status_code == 200
    assert status(api, e) == ("active", None)
    assert {a, c, d, e} <= listed(api)
    assert api.client.get(f"/v1/experts/{e}/weights").status_code == 200

    with api.app.state.runtime.sessions() as session:
        disable = session.scalars(
            select(AuditEvent)
            .where(AuditEvent.action == "expert.disable", AuditEvent.target == f"expert:{a}")
            .order_by(AuditEvent.seq)
        ).first()
        assert disable is not None
        assert {(x["expert_id"], x["status"]) for x in disable.detail["lineage"]} == {
            (d, "withdrawn_by_lineage"),
            (e, "withdrawn_by_lineage"),
        }


def test_an_owner_withdraws_and_restores_with_the_descendants(api: Api) -> None:
    a = submit(api, seed=1, name="alpha")
    b = submit(api, seed=2, name="beta")
    d = derive(api, [a, b], seed=3)
    problem(owner(api, a, "withdraw", api.tokens.bob), 403, "not_owner")
    problem(owner(api, a, "restore"), 409, "status_unchanged")
    withdrawn = owner(api, a, "withdraw")
    assert withdrawn.status_code == 200, withdrawn.text
    assert withdrawn.json()["status"] == "withdrawn"
    assert status(api, d) == ("withdrawn_by_lineage", a)
    body = problem(api.client.get(f"/v1/experts/{d}/weights"), 451, "expert_disabled")
    assert body["cause"] == {"expert_id": a, "status": "withdrawn"}
    problem(api.client.get(f"/v1/experts/{a}/weights"), 451, "expert_disabled")
    assert owner(api, a, "restore").json()["status"] == "active"
    assert status(api, d) == ("active", None)
    assert api.client.get(f"/v1/experts/{d}/weights").status_code == 200
    actions = audit_actions(api)
    assert ("alice", "expert.withdraw", f"expert:{a}") in actions
    assert ("alice", "expert.restore", f"expert:{a}") in actions


def test_a_disable_cancels_queued_and_leased_jobs_and_refuses_the_completion(api: Api) -> None:
    a = submit(api, seed=1, name="alpha")
    b = submit(api, seed=2, name="beta")
    c = submit(api, seed=4, name="gamma")
    leased_request = request_average(api, [a, b])
    job = lease(api).json()["job"]
    queued_request = request_average(api, [c, a])
    other = request_average(api, [b, c])
    evaluation = api.client.post(
        "/v1/evaluations",
        json={"expert_id": a, "text_sets": {"held_out": ["a text to score"]}},
        headers=auth(api.tokens.alice),
    )
    assert evaluation.status_code == 202, evaluation.text
    with api.app.state.runtime.sessions() as session:
        experts_before = session.scalar(select(func.count()).select_from(Expert))

    assert moderate(api, a, "disable").status_code == 200
    refused = complete_with(api, job, seed=3)
    assert problem(refused, 409, "job_cancelled")["detail"].find(a) > 0
    heartbeat = api.client.post(
        f"/v1/jobs/{job['id']}/heartbeat",
        json={"fencing_token": job["fencing_token"]},
        headers=auth(api.tokens.worker),
    )
    problem(heartbeat, 409, "job_cancelled")
    with api.app.state.runtime.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Expert)) == experts_before
        assert session.get(JobResult, job["id"]) is None
        jobs = {j.id: j.status for j in session.scalars(select(Job))}
    assert jobs[leased_request["job_id"]] == "cancelled"
    assert jobs[queued_request["job_id"]] == "cancelled"
    assert jobs[evaluation.json()["job_id"]] == "cancelled"
    assert jobs[other["job_id"]] == "queued"
    # The next lease is the composition that does not use the disabled expert.
    assert lease(api).json()["job"]["id"] == other["job_id"]
    problem(
        api.client.get(f"/v1/compositions/{leased_request['composition_id']}"),
        451,
        "expert_disabled",
    )
    # A re-enable brings none of them back: cancelled jobs stay cancelled (request again).
    assert moderate(api, a, "enable").status_code == 200
    cancelled = [leased_request["job_id"], queued_request["job_id"], evaluation.json()["job_id"]]
    with api.app.state.runtime.sessions() as session:
        assert [session.get(Job, j).status for j in cancelled] == ["cancelled"] * 3


def test_disabled_weights_cannot_come_back_under_a_new_id(api: Api) -> None:
    weights = api.expert_bytes(seed=7)
    first = api.submit(weights=weights, datasheet=make_datasheet(name="first"))
    assert first.status_code == 201
    x = first.json()["id"]
    # bob had uploaded the same bytes before the disable.
    earlier = api.submit(api.tokens.bob, weights=weights, datasheet=make_datasheet(name="copy"))
    assert earlier.status_code == 201
    y = earlier.json()["id"]
    assert moderate(api, x, "disable", "stolen weights").status_code == 200

    again = api.submit(api.tokens.bob, weights=weights, datasheet=make_datasheet(name="again"))
    body = problem(again, 451, "digest_disabled")
    assert body["cause"] == {"expert_id": x, "status": "disabled"}
    repeat = api.submit(weights=weights, datasheet=make_datasheet(name="first"))
    problem(repeat, 451, "digest_disabled")
    # The copy stored before the disable: its bytes are refused by digest.
    download = api.client.get(f"/v1/experts/{y}/weights")
    assert problem(download, 451, "digest_disabled")["cause"]["expert_id"] == x
    problem(
        api.client.get(f"/v1/experts/{y}/weights", headers=auth(api.tokens.bob)),
        451,
        "digest_disabled",
    )
    review = api.client.get(f"/v1/experts/{y}/weights", headers=auth(api.tokens.moderator))
    assert review.status_code == 200
    with api.app.state.runtime.sessions() as session:
        names = set(session.scalars(select(Expert.name)))
    assert "again" not in names


def test_reports_are_queued_resolved_and_their_outcome_shown_to_the_reporter(api: Api) -> None:
    a = submit(api, seed=1, name="alpha")
    b = submit(api, seed=2, name="beta")
    d = derive(api, [a, b], seed=3)
    bob, moderator = auth(api.tokens.bob), auth(api.tokens.moderator)
    problem(api.client.post(f"/v1/experts/{a}/reports", json={"reason": "x"}), 401, "missing_token")
    problem(
        api.client.post(f"/v1/experts/{a}/reports", json={"reason": " "}, headers=bob),
        400,
        "missing_reason",
    )
    # The server owns a report's status and reporter.
    forged = api.client.post(
        f"/v1/experts/{a}/reports", json={"reason": "x", "status": "dismissed"}, headers=bob
    )
    assert forged.status_code in (400, 422), forged.text
    first = api.client.post(
        f"/v1/experts/{a}/reports",
        json={"reason": "copied from a paid course", "evidence": "page 12 of the course"},
        headers=bob,
    )
    assert first.status_code == 201, first.text
    spam = api.client.post(
        f"/v1/experts/{b}/reports", json={"reason": "spam?"}, headers=auth(api.tokens.worker)
    ).json()
    report = first.json()
    assert (report["status"], report["reporter"], report["evidence"]) == (
        "open",
        "bob",
        "page 12 of the course",
    )
    unknown = api.client.get("/v1/reports", params={"status": "nope"}, headers=bob)
    assert unknown.status_code == 400, unknown.text
    queue = api.client.get("/v1/reports", headers=moderator).json()["items"]
    assert [r["id"] for r in queue] == [report["id"], spam["id"]]
    # Only moderators resolve; only its reporter and staff read a report.
    problem(
        api.client.post(
            f"/v1/reports/{report['id']}/resolve", json={"resolution": "dismiss"}, headers=bob
        ),
        403,
        "insufficient_role",
    )
    problem(
        api.client.get(f"/v1/reports/{report['id']}", headers=auth(api.tokens.alice)),
        403,
        "not_reporter",
    )
    dismissed = api.client.post(
        f"/v1/reports/{spam['id']}/resolve",
        json={"resolution": "dismiss", "note": "not spam"},
        headers=moderator,
    )
    assert dismissed.json()["status"] == "dismissed"
    assert status(api, b) == ("active", None)
    resolved = api.client.post(
        f"/v1/reports/{report['id']}/resolve",
        json={"resolution": "disable", "note": "confirmed with the publisher"},
        headers=moderator,
    )
    assert resolved.status_code == 200, resolved.text
    assert status(api, a) == ("disabled", None)
    assert status(api, d) == ("withdrawn_by_lineage", a)
    assert a not in listed(api)
    problem(
        api.client.post(
            f"/v1/reports/{report['id']}/resolve", json={"resolution": "dismiss"}, headers=moderator
        ),
        409,
        "report_resolved",
    )
    seen = api.client.get(f"/v1/reports/{report['id']}", headers=bob).json()
    assert (seen["status"], seen["resolution"], seen["resolved_by"]) == (
        "disabled",
        "confirmed with the publisher",
        "moderator",
    )
    actions = api.client.get(f"/v1/experts/{a}/moderation", headers=moderator).json()["items"]
    assert seen["moderation_action"] == actions[-1]["id"]
    assert f"report {report['id']}" in actions[-1]["reason"]
    mine = api.client.get("/v1/reports", headers=bob).json()["items"]
    assert [(r["id"], r["status"]) for r in mine] == [(report["id"], "disabled")]
    assert api.client.get("/v1/reports", headers=moderator).json()["items"] == []
    logged = audit_actions(api)
    assert ("bob", "expert.report", f"expert:{a}") in logged
    assert ("moderator", "expert.disable", f"expert:{a}") in logged
    assert ("moderator", "report.resolve", f"expert:{a}") in logged
