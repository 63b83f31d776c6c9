"""Proof of forgetting through the API, on SQLite and PostgreSQL (docs/governance.md,
"Proof of forgetting"): a disable queues forgetting measurements that no cancellation
touches, the worker holding one may download the disabled expert (and no one else), the
real worker (worker.runner.Worker, in-process through the SDK) runs them, and
``GET /v1/experts/{id}/forgetting`` serves the report: the domain back within 5% of the
base, the other domains moved by less than 1%."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers.artifacts import make_datasheet
from helpers.forgetting_models import DOMAINS, train_world
from helpers.in_process import in_process_agora
from sqlalchemy import select

from registry.client import Agora
from registry.db.models import AuditEvent, ForgettingReport, Job

torch = pytest.importorskip("torch")
Api = Any


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return train_world(tmp_path_factory.mktemp("forgetting-registry"))


@pytest.fixture
def agoras(client: TestClient, tokens: Any, tmp_path: Path) -> Iterator[dict[str, Agora]]:
    made = {
        name: in_process_agora(client, getattr(tokens, name), cache_dir=tmp_path / f"cache-{name}")
        for name in ("admin", "alice", "moderator", "worker")
    }
    yield made
    for agora in made.values():
        agora.close()


def drain(worker: Agora, tmp_path: Path) -> list[str]:
    """Run every runnable job with the real worker, one at a time; their outcomes."""
    from worker.runner import Worker

    runner = Worker(worker, name="forgetting-worker", lease_seconds=60, work_dir=tmp_path / "w")
    while (leased := worker.lease_job(runner.name, None, 60)) is not None:
        runner.run_job(leased)
    return runner.outcomes


def forgetting_jobs(app: Any) -> list[Job]:
    with app.state.runtime.sessions() as session:
        rows = session.scalars(select(Job).order_by(Job.id)).all()
        return [j for j in rows if j.payload.get("purpose") == "forgetting"]


def test_a_disable_is_measured_and_the_domain_returns_to_the_base(
    app: Any, client: TestClient, tokens: Any, agoras: dict[str, Agora], world: dict, tmp_path
) -> None:
    base = world["base"]
    agoras["admin"].upload_base_model(
        base / "config.json", base / "tokenizer.json", base / "model.safetensors"
    )
    experts = {}
    for domain in DOMAINS:
        sheet = make_datasheet(
            name=f"{domain} expert", domain=f"{domain} lines", samples=world["heldout"][domain]
        )
        experts[domain] = (
            agoras["alice"]
            .submit_expert(world["experts"][domain], sheet.decode(), world["revision"])
            .id
        )
    drain(agoras["worker"], tmp_path)  # whatever arrival checks there are
    ids = [experts[d] for d in DOMAINS]
    handle = agoras["alice"].compose("ensemble", base_revision=world["revision"], experts=ids)
    assert drain(agoras["worker"], tmp_path) == ["succeeded"]
    composition = handle.wait(timeout=5)
    assert composition.status == "ready"

    forgotten = experts["sums"]
    agoras["moderator"].disable_expert(forgotten, "the sums were copied")
    queued = forgetting_jobs(app)
    assert [j.status for j in queued] == ["queued", "queued"]  # not cancelled by the disable
    pending = client.get(f"/v1/experts/{forgotten}/forgetting").json()["items"]
    assert {(r["composition_id"], r["status"]) for r in pending} == {
        (None, "pending"),
        (composition.id, "pending"),
    }

    assert drain(agoras["worker"], tmp_path) == ["succeeded", "succeeded"]
    body = client.get(f"/v1/experts/{forgotten}/forgetting").json()  # anyone reads it
    reports = {r["composition_id"]: r for r in body["items"]}
    assert {r["status"] for r in reports.values()} == {"ready"}

    report = reports[composition.id]
    assert report["method"] == "ensemble"
    assert report["without_method"] == "ensemble"
    domain = report["domain"]
    assert domain["with"] < 0.9 * domain["base"]  # the expert mattered on its own domain
    assert abs(domain["without_vs_base"]) <= 0.05  # without it the domain is the base's
    assert domain["without_vs_base"] == pytest.approx(
        (domain["without"] - domain["base"]) / domain["base"]
    )
    assert set(report["others"]) == {experts["dna"], experts["code"]}
    for other in report["others"].values():
        assert abs(other["change"]) < 0.01  # the other domains do not move

    # The moderation page shows the numbers, the other domains by their experts' names.
    from registry.web.sessions import SESSION_COOKIE, sign_in

    with app.state.runtime.sessions() as session, session.begin():
        session_id, _ = sign_in(session=session, secret=tokens.moderator, hours=1)
    client.cookies.set(SESSION_COOKIE, session_id)
    page = client.get("/moderation")
    client.cookies.clear()
    assert page.status_code == 200
    for domain_name in ("dna", "code"):
        row = f'<tr data-text-set="{experts[domain_name]}"><td>{domain_name} expert <small'
        assert row in page.text

    alone = reports[None]
    assert alone["method"] == "expert"
    assert alone["without_method"] == "base"
    assert alone["domain"]["without"] == alone["domain"]["base"]
    assert alone["domain"]["with"] < 0.9 * alone["domain"]["base"]
    assert alone["others"] == {}

    # The worker's downloads of the disabled expert were recorded.
    with app.state.runtime.sessions() as session:
        entries = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "expert.review_download")
        ).all()
        assert {(e.actor, e.target) for e in entries} == {("worker", f"expert:{forgotten}")}
    # Re-enabling keeps the reports (history); the SDK reads them.
    agoras["moderator"].enable_expert(forgotten, "false alarm")
    kept = agoras["alice"].moderation.forgetting(forgotten)
    assert len(kept) == 2
    assert {r.status for r in kept} == {"ready"}


def _submit(api: Api, seed: int, name: str) -> str:
    response = api.submit(
        weights=api.expert_bytes(seed=seed),
        datasheet=make_datasheet(name=name, samples=[f"{name} sample text"]),
    )
    assert response.status_code == 201, response.text
    expert_id = str(response.json()["id"])
    with api.app.state.runtime.sessions() as session, session.begin():
        # Whatever arrival check there is: these random experts are never measured here.
        for job in session.scalars(select(Job).where(Job.status == "queued")):
            job.status = "cancelled"
        from registry.db.models import Expert

        expert = session.get(Expert, expert_id)
        assert expert is not None
        expert.status = "active"
    return expert_id


def _lease(api: Api, token: str) -> dict[str, Any]:
    response = api.client.post("/v1/jobs/lease", json={"worker": "w"}, headers=auth(token))
    assert response.status_code == 200, response.text
    return dict(response.json()["job"])


def test_only_the_worker_holding_the_lease_reads_the_disabled_expert(api: Api) -> None:
    from registry.services.tokens import create_token

    expert = _submit(api, 1, "alpha")
    with api.app.state.runtime.sessions() as session, session.begin():
        _, other_worker = create_token(session=session, name="other", role="worker")
    # A user's evaluation of the expert, queued before the disable: it is cancelled; the
    # forgetting measurement is not.
    asked = api.client.post(
        "/v1/evaluations",
        json={"expert_id": expert, "text_sets": {"t": ["some text"]}},
        headers=auth(api.tokens.alice),
    )
    assert asked.status_code == 202, asked.text
    disabled = api.client.post(
        f"/v1/experts/{expert}/disable", json={"reason": "r"}, headers=auth(api.tokens.moderator)
    )
    assert disabled.status_code == 200, disabled.text
    with api.app.state.runtime.sessions() as session:
        jobs = {j.id: j for j in session.scalars(select(Job))}
        assert jobs[asked.json()["job_id"]].status == "cancelled"
        report = session.scalars(select(ForgettingReport)).one()
        assert jobs[report.job_id].status == "queued"

    weights = f"/v1/experts/{expert}/weights"
    assert api.client.get(weights, headers=auth(api.tokens.worker)).status_code == 451
    job = _lease(api, api.tokens.worker)
    assert job["id"] == report.job_id
    served = api.client.get(weights, headers=auth(api.tokens.worker))
    assert served.status_code == 200
    assert served.content == api.expert_bytes(seed=1)
    # Another worker token, an anonymous reader and the owner are still refused.
    for headers in (auth(other_worker), {}, auth(api.tokens.alice)):
        assert api.client.get(weights, headers=headers).status_code == 451
    # A failed measurement makes its report failed, with the job's error.
    failed = api.client.post(
        f"/v1/jobs/{job['id']}/fail",
        json={"fencing_token": job["fencing_token"], "error": "out of memory", "retryable": False},
        headers=auth(api.tokens.worker),
    )
    assert failed.status_code == 200, failed.text
    assert api.client.get(weights, headers=auth(api.tokens.worker)).status_code == 451
    (view,) = api.client.get(f"/v1/experts/{expert}/forgetting").json()["items"]
    assert view["status"] == "failed"
    assert "out of memory" in view["error"]
    assert view["domain"] is None


def test_an_unknown_expert_has_no_forgetting_reports(api: Api) -> None:
    response = api.client.get("/v1/experts/ex_nope/forgetting")
    assert response.status_code == 404
    assert response.json()["code"] == "expert_not_found"


def test_a_report_resolved_by_disabling_queues_the_measurement(api: Api) -> None:
    expert = _submit(api, 2, "beta")
    filed = api.client.post(
        f"/v1/experts/{expert}/reports", json={"reason": "copied"}, headers=auth(api.tokens.bob)
    )
    assert filed.status_code == 201, filed.text
    resolved = api.client.post(
        f"/v1/reports/{filed.json()['id']}/resolve",
        json={"resolution": "disable"},
        headers=auth(api.tokens.moderator),
    )
    assert resolved.status_code == 200, resolved.text
    (view,) = api.client.get(f"/v1/experts/{expert}/forgetting").json()["items"]
    assert view["status"] == "pending"
    assert view["moderation_action"] == resolved.json()["moderation_action"]
    assert (view["composition_id"], view["without_method"]) == (None, "base")
    # An owner's withdrawal is not a disable: nothing is measured.
    other = _submit(api, 3, "gamma")
    withdrawn = api.client.post(
        f"/v1/experts/{other}/withdraw", json={}, headers=auth(api.tokens.alice)
    )
    assert withdrawn.status_code == 200, withdrawn.text
    assert api.client.get(f"/v1/experts/{other}/forgetting").json()["items"] == []


def _compose(api: Api, method: str, experts: list[str]) -> dict[str, Any]:
    response = api.client.post(
        "/v1/compositions",
        json={"base_revision": api.base.revision, "method": method, "experts": experts},
        headers=auth(api.tokens.alice),
    )
    assert response.status_code == 202, response.text
    return dict(response.json())


def _finish(api: Api, request: dict[str, Any], *, seed: int | None = None) -> dict[str, Any]:
    """Play the worker for the job of ``request``: complete it (with produced weights for
    an average). Returns the completion's result."""
    job = _lease(api, api.tokens.worker)
    assert job["id"] == request["job_id"]
    url, headers = f"/v1/jobs/{job['id']}/complete", auth(api.tokens.worker)
    if seed is None:
        done = api.client.post(
            url, json={"fencing_token": job["fencing_token"], "result": {}}, headers=headers
        )
    else:
        done = api.client.post(
            url,
            data={"fencing_token": str(job["fencing_token"]), "result": json.dumps({})},
            files={"weights": ("out.safetensors", api.expert_bytes(seed=seed))},
            headers=headers,
        )
    assert done.status_code == 200, done.text
    return dict(done.json()["result"])


def test_a_composition_that_used_only_a_descendant_is_measured_without_it(api: Api) -> None:
    """A made from nothing; D the average of A and B (withdrawn by lineage when A is
    disabled); a mixture of D and C never named A, and is measured without D, on A's
    samples and C's."""
    a, b, c = (_submit(api, seed, name) for seed, name in ((1, "a"), (2, "b"), (3, "c")))
    average = _compose(api, "average", [a, b])
    d = _finish(api, average, seed=5)["expert_id"]
    mixture = _compose(api, "mixture", [d, c])
    _finish(api, mixture)

    disabled = api.client.post(
        f"/v1/experts/{a}/disable", json={"reason": "r"}, headers=auth(api.tokens.moderator)
    )
    assert disabled.status_code == 200, disabled.text
    items = api.client.get(f"/v1/experts/{a}/forgetting").json()["items"]
    by_composition = {r["composition_id"]: r for r in items}
    assert set(by_composition) == {None, average["composition_id"], mixture["composition_id"]}
    assert by_composition[None]["removed"] == [a]
    assert by_composition[average["composition_id"]]["removed"] == [a]
    assert by_composition[average["composition_id"]]["without_method"] == "average"
    via_d = by_composition[mixture["composition_id"]]
    assert via_d["removed"] == [d]
    assert via_d["without_method"] == "mixture"
    assert via_d["status"] == "pending"
    with api.app.state.runtime.sessions() as session:
        job = session.get(Job, via_d["job_id"])
        assert job is not None
        payload = job.payload
    assert [e["id"] for e in payload["subject"]["without"]["experts"]] == [c]
    assert set(payload["text_sets"]) == {"domain", c}
    assert payload["text_sets"]["domain"] == ["a sample text"]
