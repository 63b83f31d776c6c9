"""Monitoring through the HTTP API, on SQLite and PostgreSQL: text sets, schedules whose
jobs wait for their not-before time, the numbers a run records, its flags and a repeating
schedule's next run (docs/governance.md, "Monitoring"). The test plays the worker, as
tests/registry/test_governance.py does; tests/worker/test_monitoring.py runs the real one.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import pytest
from helpers.artifacts import make_datasheet

from registry.db.models import AuditEvent, Job
from registry.settings import Settings

Api = Any


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    # Experts go active at once: monitoring measures active experts only.
    return Settings(
        data_dir=tmp_path / "agora",
        database_url=database_url,
        arrival_checks=False,
        max_text_set_bytes=4096,
    )


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def problem(response: Any, status_code: int, code: str) -> dict[str, Any]:
    assert response.status_code == status_code, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = dict(response.json())
    assert body["code"] == code, body
    return body


def submit(api: Api, *, seed: int, name: str) -> str:
    response = api.submit(
        weights=api.expert_bytes(seed=seed),
        datasheet=make_datasheet(name=name, samples=[f"{name} sample text"]),
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def upload(api: Api, name: str, date: str, texts: list[str], token: str | None = None) -> Any:
    return api.client.post(
        "/v1/text-sets",
        json={"name": name, "date": date, "texts": texts},
        headers=auth(token or api.tokens.moderator),
    )


def schedule(api: Api, **body: Any) -> Any:
    return api.client.post(
        "/v1/monitoring/schedules", json=body, headers=auth(api.tokens.moderator)
    )


def iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).isoformat()


def lease(api: Api) -> dict[str, Any] | None:
    response = api.client.post(
        "/v1/jobs/lease", json={"worker": "test-worker"}, headers=auth(api.tokens.worker)
    )
    if response.status_code == 204:
        return None  # nothing to lease
    assert response.status_code == 200, response.text
    job = response.json()["job"]
    return dict(job) if job else None


def complete(
    api: Api, job: dict[str, Any], *, own: float, repetition: float | None, base_rep: float = 0.2
) -> Any:
    results = {
        name: {
            "bits_per_byte": own if name == "samples" else 3.0,
            "base_bits_per_byte": 3.5,
            "tokens": 10,
            "bytes": 40,
        }
        for name in job["payload"]["text_sets"]
    }
    result: dict[str, Any] = {"results": results}
    if repetition is not None:
        result["continuations"] = {
            "repetition": repetition,
            "base_repetition": base_rep,
            "ngram": 4,
            "prompts": 1,
            "tokens": 48,
            "base_tokens": 48,
            "sample": "x x x x",
        }
    return api.client.post(
        f"/v1/jobs/{job['id']}/complete",
        json={"fencing_token": job["fencing_token"], "result": result},
        headers=auth(api.tokens.worker),
    )


def runs(api: Api, expert_id: str) -> list[dict[str, Any]]:
    response = api.client.get(
        "/v1/monitoring/runs", params={"expert_id": expert_id}, headers=auth(api.tokens.moderator)
    )
    assert response.status_code == 200, response.text
    return list(response.json()["items"])


def flags(api: Api) -> list[dict[str, Any]]:
    response = api.client.get("/v1/reports", headers=auth(api.tokens.moderator))
    return [r for r in response.json()["items"] if r["reporter"] == "registry"]


def test_text_sets_upload_list_read_and_refusals(api: Api) -> None:
    first = upload(api, "news", "2026-11-01", ["old news", "  "])
    assert first.status_code == 201, first.text
    assert first.json()["n_texts"] == 1  # the blank text is dropped
    assert upload(api, "sports", "2026-11-15", ["a match"]).status_code == 201
    newest = upload(api, "news", "2026-12-01", ["new news"], token=api.tokens.admin)
    assert newest.status_code == 201
    assert newest.json()["key"] == "news@2026-12-01"

    problem(upload(api, "news", "2026-12-01", ["again"]), 409, "text_set_exists")
    problem(upload(api, "news", "2026-12-02", ["x" * 4097]), 413, "text_set_too_large")
    problem(upload(api, "news", "2026-13-01", ["x"]), 400, "invalid_date")
    problem(upload(api, "bad name", "2026-12-01", ["x"]), 400, "invalid_name")
    problem(upload(api, "news", "2026-12-03", [" "]), 400, "invalid_texts")
    problem(
        upload(api, "news", "2026-12-04", ["x"], token=api.tokens.alice), 403, "insufficient_role"
    )
    problem(
        api.client.post("/v1/text-sets", json={"name": "n", "date": "2026-12-01", "texts": ["x"]}),
        401,
        "missing_token",
    )
    # Any token lists them (newest first, without texts); only moderators read the texts.
    listed = api.client.get("/v1/text-sets", headers=auth(api.tokens.alice)).json()["items"]
    assert [(s["name"], s["date"]) for s in listed] == [
        ("news", "2026-12-01"),
        ("sports", "2026-11-15"),
        ("news", "2026-11-01"),
    ]
    assert "texts" not in listed[0] or listed[0]["texts"] is None
    set_id = newest.json()["id"]
    problem(
        api.client.get(f"/v1/text-sets/{set_id}", headers=auth(api.tokens.alice)),
        403,
        "insufficient_role",
    )
    read = api.client.get(f"/v1/text-sets/{set_id}", headers=auth(api.tokens.moderator))
    assert read.json()["texts"] == ["new news"]
    with api.app.state.runtime.sessions() as session:
        actions = [e.action for e in session.query(AuditEvent).order_by(AuditEvent.seq)]
    assert actions.count("text_set.upload") == 3
    # Deleted: gone from the list and from future runs; audited.
    deleted = api.client.delete(f"/v1/text-sets/{set_id}", headers=auth(api.tokens.moderator))
    assert deleted.status_code == 200, deleted.text
    problem(
        api.client.get(f"/v1/text-sets/{set_id}", headers=auth(api.tokens.moderator)),
        404,
        "text_set_not_found",
    )
    listed = api.client.get("/v1/text-sets", headers=auth(api.tokens.alice)).json()["items"]
    assert [s["date"] for s in listed] == ["2026-11-15", "2026-11-01"]
    with api.app.state.runtime.sessions() as session:
        last = session.query(AuditEvent).order_by(AuditEvent.seq.desc()).first()
        assert last is not None
        assert (last.action, last.target) == ("text_set.delete", f"text_set:{set_id}")


def test_a_schedules_jobs_wait_for_not_before_then_are_leased(api: Api) -> None:
    a = submit(api, seed=1, name="alpha")
    b = submit(api, seed=2, name="beta")
    upload(api, "news", "2026-11-01", ["old news"])
    upload(api, "news", "2026-12-01", ["new news"])
    problem(schedule(api, not_before="2026-12-01T00:00:00"), 400, "invalid_time")
    problem(schedule(api, text_sets=["nope"]), 404, "text_set_not_found")
    problem(schedule(api, every_hours=0), 400, "invalid_interval")
    problem(schedule(api, every_hours=1e9), 400, "invalid_interval")
    problem(schedule(api, not_before="9999-12-31T23:00:00Z"), 400, "invalid_time")
    problem(schedule(api, text_sets=["no such/name"]), 400, "invalid_name")
    problem(schedule(api, limit=0), 400, "invalid_request")
    missing = api.client.get("/v1/text-sets/999", headers=auth(api.tokens.moderator))
    problem(missing, 404, "text_set_not_found")
    problem(
        api.client.post("/v1/monitoring/schedules", json={}, headers=auth(api.tokens.alice)),
        403,
        "insufficient_role",
    )

    soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1.5)
    made = schedule(api, not_before=iso(soon))
    assert made.status_code == 201, made.text
    assert len(made.json()["jobs"]) == 2
    assert lease(api) is None  # not before its time
    time.sleep(max(0.0, (soon - dt.datetime.now(dt.UTC)).total_seconds()) + 0.1)
    leased = [lease(api), lease(api)]
    assert all(job is not None for job in leased)
    subjects = {job["payload"]["subject"]["expert"]["id"] for job in leased if job}
    assert subjects == {a, b}
    payload = leased[0]["payload"] if leased[0] else {}
    assert payload["purpose"] == "monitor"
    # Its own samples and the newest set of each name.
    assert set(payload["text_sets"]) == {"samples", "news@2026-12-01"}
    assert payload["continuations"]["text_set"] == "samples"
    assert lease(api) is None


def test_a_run_records_its_numbers_and_flags_a_worsening(api: Api) -> None:
    a = submit(api, seed=1, name="alpha")
    # Due an hour ago: its next run (a day later) is due tomorrow.
    past = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=1)
    first = schedule(api, not_before=iso(past), every_hours=24)
    assert first.status_code == 201, first.text
    job = lease(api)
    assert job is not None
    # A missing continuations answer is refused: the job asked for it.
    problem(complete(api, job, own=2.0, repetition=None), 422, "invalid_result")
    job = lease(api) or job
    assert complete(api, job, own=2.0, repetition=0.1).status_code == 200
    (run,) = [r for r in runs(api, a) if r["job_id"] == job["id"]]
    # The first own-domain evaluation is the reference: no change.
    assert run["own_bits_per_byte"] == 2.0
    assert run["reference_bits_per_byte"] == 2.0
    assert run["worsening"] == 0.0
    assert (run["repetition"], run["base_repetition"], run["report_id"]) == (0.1, 0.2, None)
    assert flags(api) == []
    # The repeating schedule queued the next run a day after this one's time.
    with api.app.state.runtime.sessions() as session:
        queued = session.query(Job).filter(Job.status == "queued").all()
        assert len(queued) == 1
        assert queued[0].run_after == past + dt.timedelta(hours=24)
        assert queued[0].payload["purpose"] == "monitor"

    # Another run, due now, measures a worse expert than its reference: flagged.
    assert schedule(api, not_before=iso(past)).status_code == 201
    job2 = lease(api)
    assert job2 is not None
    assert job2["id"] != queued[0].id
    assert complete(api, job2, own=2.2, repetition=0.1).status_code == 200
    (run2,) = [r for r in runs(api, a) if r["job_id"] == job2["id"]]
    assert run2["reference_bits_per_byte"] == 2.0
    assert run2["worsening"] == pytest.approx(0.1)
    (flag,) = flags(api)
    assert flag["expert_id"] == a
    assert run2["report_id"] == flag["id"]
    assert "worsened by 10.00%" in flag["reason"]
    numbers = json.loads(flag["evidence"])
    assert numbers["own_bits_per_byte"] == 2.2
    assert numbers["reference_bits_per_byte"] == 2.0
    assert numbers["max_worsening"] == 0.02


def test_repetition_flags_only_above_the_threshold_and_the_base(api: Api) -> None:
    submit(api, seed=1, name="alpha")
    past = iso(dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    outcomes = []
    for repetition, base_rep in [(0.9, 0.95), (0.4, 0.1), (0.9, 0.3)]:
        assert schedule(api, not_before=past).status_code == 201
        job = lease(api)
        assert job is not None
        done = complete(api, job, own=2.0, repetition=repetition, base_rep=base_rep)
        assert done.status_code == 200, done.text
        outcomes.append(len(flags(api)))
    # Not above the base's; not above 0.5; above both: flagged.
    assert outcomes == [0, 0, 1]
    (flag,) = flags(api)
    assert "repeat 90.00%" in flag["reason"]
    assert json.loads(flag["evidence"])["base_repetition"] == 0.3


def test_cancel_a_schedule(api: Api) -> None:
    submit(api, seed=1, name="alpha")
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    made = schedule(api, not_before=iso(later), every_hours=1).json()
    listed = api.client.get("/v1/monitoring/schedules", headers=auth(api.tokens.moderator))
    assert [s["id"] for s in listed.json()["items"]] == [made["id"]]
    path = f"/v1/monitoring/schedules/{made['id']}"
    cancelled = api.client.delete(path, headers=auth(api.tokens.moderator))
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["cancelled_jobs"] == made["jobs"]
    with api.app.state.runtime.sessions() as session:
        job = session.get(Job, made["jobs"][0])
        assert job is not None
        assert job.status == "cancelled"
    problem(api.client.delete(path, headers=auth(api.tokens.moderator)), 409, "schedule_cancelled")
    problem(
        api.client.delete("/v1/monitoring/schedules/999", headers=auth(api.tokens.moderator)),
        404,
        "schedule_not_found",
    )


def test_the_next_run_takes_the_newest_sets_then_and_a_cancel_ends_the_chain(api: Api) -> None:
    submit(api, seed=1, name="alpha")
    upload(api, "news", "2026-11-01", ["november news"])
    sports = upload(api, "sports", "2026-11-02", ["a match"]).json()["id"]
    past = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=1)
    made = schedule(api, not_before=iso(past), every_hours=2, text_sets=["news", "sports"])
    assert made.status_code == 201, made.text
    job = lease(api)
    assert job is not None
    assert set(job["payload"]["text_sets"]) == {"samples", "news@2026-11-01", "sports@2026-11-02"}
    # Before it completes, December's news arrives and the sports set is deleted.
    upload(api, "news", "2026-12-01", ["december news"])
    assert (
        api.client.delete(f"/v1/text-sets/{sports}", headers=auth(api.tokens.moderator)).status_code
        == 200
    )
    assert complete(api, job, own=2.0, repetition=0.1).status_code == 200
    with api.app.state.runtime.sessions() as session:
        (following,) = session.query(Job).filter(Job.status == "queued").all()
        assert set(following.payload["text_sets"]) == {"samples", "news@2026-12-01"}
        assert following.run_after == past + dt.timedelta(hours=2)
        # Due now (as if two hours had passed), leased, then its schedule is cancelled.
        following.run_after = past
        session.commit()
    leased = lease(api)
    assert leased is not None
    assert leased["id"] == following.id
    path = f"/v1/monitoring/schedules/{made.json()['id']}"
    assert (
        api.client.delete(path, headers=auth(api.tokens.moderator)).json()["cancelled_jobs"] == []
    )  # the leased one finishes
    assert complete(api, leased, own=2.0, repetition=0.1).status_code == 200
    with api.app.state.runtime.sessions() as session:
        assert session.query(Job).filter(Job.status == "queued").count() == 0
    listed = api.client.get("/v1/monitoring/schedules", headers=auth(api.tokens.moderator))
    (row,) = listed.json()["items"]
    assert (row["runs"], row["completed"], row["flagged"]) == (2, 2, 0)
