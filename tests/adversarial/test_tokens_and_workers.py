"""Tokens and workers under attack (SQLite and PostgreSQL).

* No plaintext bearer token is stored: tokens made by `agora admin create-token` and used
  on the API, then every table dumped (and, on SQLite, the database files read raw) and
  scanned for each secret and for its part after the ``agora_`` prefix.
* Tokens are looked up by hash and compared with ``hmac.compare_digest``: the secret never
  reaches the database, and the comparisons made are of digests.
* Fencing tokens are unguessable (random, not sequential) and shown only to the lease
  holder; a worker cannot heartbeat, fail, release or complete a job another holds, even
  with its current fencing token read from the database.
* A worker whose results are refused repeatedly is suspended (403 ``token_suspended``),
  the suspension is audited, its jobs go back to the queue, and an admin can lift it.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from helpers.adversarial import report, scaled
from sqlalchemy import event, inspect, select, text, update
from typer.testing import CliRunner

from registry.app import create_app
from registry.db.models import AuditEvent, Job, JobResult, Token
from registry.services import audit
from registry.services import jobs as jobs_svc
from registry.services import tokens as tokens_svc
from registry.services.tokens import TOKEN_PREFIX, create_token
from registry.settings import Settings

EVALUATE_PAYLOAD = {"text_sets": {"news": ["some text"]}, "subject": {"kind": "expert"}}


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@dataclass
class World:
    app: FastAPI
    client: TestClient
    settings: Settings
    database_url: str

    @property
    def runtime(self) -> Any:
        return self.app.state.runtime

    def token(self, role: str, name: str) -> tuple[int, str]:
        """A token made in the database directly (the plaintext test uses the CLI)."""
        with self.runtime.sessions() as session, session.begin():
            row, secret = create_token(session=session, name=name, role=role)
            return row.id, secret

    def jobs(self, n: int, *, created_by: str = "alice") -> list[str]:
        with self.runtime.sessions() as session, session.begin():
            return [
                jobs_svc.create_job(
                    session=session,
                    kind="evaluate",
                    payload=EVALUATE_PAYLOAD,
                    created_by=created_by,
                    max_attempts=3,
                ).id
                for _ in range(n)
            ]

    def row(self, job_id: str) -> Job:
        with self.runtime.sessions() as session:
            job: Job | None = session.get(Job, job_id)
            assert job is not None
            session.expunge(job)
            return job

    def token_row(self, token_id: int) -> Token:
        with self.runtime.sessions() as session:
            token: Token | None = session.get(Token, token_id)
            assert token is not None
            session.expunge(token)
            return token

    def lease(self, secret: str, worker: str = "w") -> Any:
        return self.client.post(
            "/v1/jobs/lease", json={"worker": worker, "kinds": ["evaluate"]}, headers=auth(secret)
        )

    def post(self, secret: str, job_id: str, action: str, body: dict[str, Any]) -> Any:
        return self.client.post(f"/v1/jobs/{job_id}/{action}", json=body, headers=auth(secret))


@pytest.fixture
def world(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    settings = Settings(data_dir=tmp_path / "agora", database_url=database_url)
    # `agora admin` works on the same database as the app.
    monkeypatch.setenv("AGORA_DATABASE_URL", database_url)
    monkeypatch.setenv("AGORA_DATA_DIR", str(tmp_path / "agora"))
    app = create_app(settings)
    with TestClient(app) as client:
        yield World(app, client, settings, database_url)


def problem(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["code"] == code
    return body


def cli(*args: str) -> str:
    from agora.cli import build_app

    result = CliRunner().invoke(build_app(), list(args))
    assert result.exit_code == 0, result.output
    return result.output


def cli_token(role: str, name: str, *extra: str) -> tuple[int, str]:
    """`agora admin create-token`, as an operator runs it: the id, and the secret (last line)."""
    out = cli("admin", "create-token", "--role", role, "--name", name, *extra)
    found = re.search(r"token #(\d+)", out)
    assert found is not None, out
    return int(found.group(1)), out.strip().splitlines()[-1]


def dump_database(world: World) -> str:
    """Every row of every table, as text; on SQLite also the database files' raw bytes."""
    parts: list[str] = []
    engine = world.runtime.engine
    with engine.connect() as connection:
        for table in inspect(connection).get_table_names():
            rows = connection.execute(text(f'SELECT * FROM "{table}"')).all()
            parts.append(f"{table}: {rows!r}")
    if engine.dialect.name == "sqlite":
        database = Path(engine.url.database)
        for path in database.parent.glob(database.name + "*"):  # -wal, -journal, -shm
            parts.append(path.read_bytes().decode("latin-1"))
    return "\n".join(parts)


def test_no_plaintext_token_is_stored(world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    _, admin = cli_token("admin", "root")
    worker_id, worker = cli_token("worker", "farm", "--trusted")
    rogue_id, rogue = cli_token("worker", "rogue")
    _, carol = cli_token("contributor", "carol")
    retired_id, revoked = cli_token("worker", "retired")
    cli("admin", "revoke-token", str(retired_id))
    secrets = {"admin": admin, "worker": worker, "rogue": rogue, "carol": carol, "revoked": revoked}
    assert world.token_row(worker_id).trusted is True
    assert world.token_row(rogue_id).trusted is False

    # Use every token: reads, a lease and its heartbeat, hijack attempts until the rogue is
    # suspended (a refusal count, an audit row), and a near miss of each secret.
    (job_id,) = world.jobs(1, created_by="carol")
    leased = world.lease(worker).json()["job"]
    fencing = leased["fencing_token"]
    assert world.post(worker, job_id, "heartbeat", {"fencing_token": fencing}).status_code == 200
    for _ in range(world.settings.worker_suspend_after_refusals):
        world.post(rogue, job_id, "fail", {"fencing_token": fencing, "release": True})
    problem(world.lease(rogue), 403, "token_suspended")
    assert world.client.get(f"/v1/jobs/{job_id}", headers=auth(carol)).status_code == 200
    assert world.client.get("/v1/jobs", headers=auth(admin)).status_code == 200
    for secret in secrets.values():
        near = secret[:-1] + ("A" if secret[-1] != "A" else "B")
        problem(world.client.get("/v1/jobs", headers=auth(near)), 401, "invalid_token")
    # A control: a canary written into a JSON column last is found by the same scan.
    canary = TOKEN_PREFIX + "canary-" + hashlib.sha256(rogue.encode()).hexdigest()[:20]
    with world.runtime.sessions() as session, session.begin():
        audit.append(session, actor="test", action="canary", target="-", detail={"c": canary})
    dumped = dump_database(world)
    assert canary in dumped
    # The dump holds the tokens (hashes, prefixes, the audit row): the scan is not vacuous.
    assert hashlib.sha256(admin.encode()).hexdigest() in dumped
    assert admin[: len(TOKEN_PREFIX) + 6] in dumped
    assert f"token:{rogue_id}" in dumped
    scanned = 0
    for name, secret in secrets.items():
        random_part = secret.removeprefix(TOKEN_PREFIX)
        assert len(random_part) >= 40
        for needle in (secret, random_part):
            scanned += 1
            assert needle not in dumped, f"the {name} token is stored in clear"
            assert all(needle not in record.getMessage() for record in caplog.records)
    report(
        "tokens: plaintext scan",
        tokens=len(secrets),
        needles=scanned,
        dump_chars=len(dumped),
        found=0,
    )


def test_token_lookup_uses_the_hash_and_compare_digest(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker_id, secret = world.token("worker", "w")
    digest = hashlib.sha256(secret.encode()).hexdigest()
    statements: list[tuple[str, Any]] = []

    def capture(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: Any
    ) -> None:
        statements.append((statement, params))

    compared: list[tuple[Any, Any]] = []

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return hmac.compare_digest(a, b)

    monkeypatch.setattr(tokens_svc, "hmac", SimpleNamespace(compare_digest=spy))
    monkeypatch.setattr(jobs_svc, "hmac", SimpleNamespace(compare_digest=spy))
    engine = world.runtime.engine
    event.listen(engine, "before_cursor_execute", capture)
    try:
        (job_id,) = world.jobs(1)
        leased = world.lease(secret).json()["job"]
        beat = world.post(secret, job_id, "heartbeat", {"fencing_token": leased["fencing_token"]})
        assert beat.status_code == 200, beat.text
        near = secret[:-1] + ("A" if secret[-1] != "A" else "B")
        problem(world.lease(near), 401, "invalid_token")
    finally:
        event.remove(engine, "before_cursor_execute", capture)

    sent = repr(statements)
    # The secret never reaches the database; its digest is what is looked up.
    assert secret not in sent
    assert secret.removeprefix(TOKEN_PREFIX) not in sent
    assert digest in sent
    # The stored hash is compared to the request's with compare_digest (never the secret),
    # and so is the fencing token.
    assert (digest, digest) in compared
    assert all(secret not in repr(pair) for pair in compared)
    fencing = leased["fencing_token"].to_bytes(8, "big")
    assert (fencing, fencing) in compared
    assert world.token_row(worker_id).token_hash == digest


def test_fencing_tokens_are_random_and_shown_only_to_the_holder(world: World) -> None:
    n = scaled(50, 500)
    _, holder = world.token("worker", "holder")
    _, other = world.token("worker", "other")
    _, admin = world.token("admin", "admin")
    _, moderator = world.token("moderator", "moderator")
    _, alice = world.token("contributor", "alice")
    ids = sorted(world.jobs(n))  # leased oldest id first
    leased = [world.lease(holder).json()["job"] for _ in range(n)]
    assert [j["id"] for j in leased] == ids
    tokens = [j["fencing_token"] for j in leased]
    assert len(set(tokens)) == n
    assert all(isinstance(t, int) and 0 < t < 2**53 for t in tokens)
    steps = [b - a for a, b in itertools.pairwise(tokens)]
    # Random 53-bit draws: no step is small, and they do not repeat (no counter, no stride).
    assert min(abs(s) for s in steps) > 2**20
    assert len(set(steps)) == len(steps)
    assert max(tokens) > 2**50
    # A job expired and leased again gets a fresh token too.
    with world.runtime.sessions() as session, session.begin():
        session.execute(
            update(Job).where(Job.id == ids[0]).values(lease_expires_at=Job.created_at, attempts=1)
        )
    again = world.lease(other).json()["job"]
    assert again["id"] == ids[0]
    assert again["fencing_token"] not in tokens

    target, token = ids[1], tokens[1]
    seen = {
        who: world.client.get(f"/v1/jobs/{target}", headers=auth(secret)).json()
        for who, secret in [
            ("holder", holder),
            ("other", other),
            ("admin", admin),
            ("moderator", moderator),
            ("alice", alice),
        ]
    }
    assert seen["holder"]["fencing_token"] == token
    for who in ("other", "admin", "moderator", "alice"):
        assert seen[who]["status"] == "leased"
        assert seen[who]["fencing_token"] is None, who
    for secret in (admin, moderator):
        listed = world.client.get("/v1/jobs?limit=500", headers=auth(secret)).json()["items"]
        assert len(listed) == n
        assert all(item["fencing_token"] is None for item in listed)
    # An error never tells the current token, whoever asks and whatever they send.
    for secret, sent in [(other, token + 1), (holder, token + 1), (other, 1)]:
        answer = world.post(secret, target, "heartbeat", {"fencing_token": sent})
        assert answer.status_code in (403, 409)
        assert str(token) not in answer.text
    report(
        "fencing tokens",
        leases=n + 1,
        distinct=len(set(tokens)),
        min_step=min(abs(s) for s in steps),
        shown_to_non_holders=0,
    )


def test_a_worker_cannot_act_on_a_job_another_holds(world: World) -> None:
    _, holder = world.token("worker", "holder")
    _, thief = world.token("worker", "thief")
    _, admin = world.token("admin", "admin")
    (job_id,) = world.jobs(1)
    leased = world.lease(holder).json()["job"]
    before = world.row(job_id)
    # The thief knows everything: the current fencing token, straight from the database.
    stolen = before.fencing_token
    assert stolen == leased["fencing_token"]
    good = {"results": {"news": {"bits_per_byte": 1.0, "tokens": 3, "bytes": 9}}}
    attempts: list[tuple[str, dict[str, Any]]] = [
        ("heartbeat", {"fencing_token": stolen, "progress": {"done": 9}}),
        ("fail", {"fencing_token": stolen, "error": "x", "retryable": False}),
        ("fail", {"fencing_token": stolen, "release": True}),
        ("complete", {"fencing_token": stolen, "result": good}),
    ]
    refused = 0
    for secret in (thief, admin):
        for action, body in attempts:
            body_text = problem(world.post(secret, job_id, action, body), 403, "not_lease_holder")
            assert str(stolen) not in body_text["detail"]
            refused += 1
    after = world.row(job_id)
    assert (after.status, after.fencing_token, after.attempts) == ("leased", stolen, 1)
    assert after.lease_token_id == before.lease_token_id
    assert after.lease_expires_at == before.lease_expires_at
    assert after.progress is None
    assert after.error is None
    with world.runtime.sessions() as session:
        assert session.get(JobResult, job_id) is None
    # The holder still holds it, and gives it back; then the lease is nobody's.
    beat = world.post(holder, job_id, "heartbeat", {"fencing_token": stolen})
    assert beat.status_code == 200, beat.text
    released = world.post(holder, job_id, "fail", {"fencing_token": stolen, "release": True})
    assert released.status_code == 200, released.text
    assert released.json()["fencing_token"] is None
    assert world.row(job_id).lease_token_id is None
    # The thief leases it next: the old token is worthless to everyone.
    mine = world.lease(thief).json()["job"]
    assert mine["fencing_token"] != stolen
    problem(world.post(holder, job_id, "heartbeat", {"fencing_token": stolen}), 409, "lease_lost")
    report("hijack attempts", tried=refused, accepted=0, job_changed=0)


def test_repeated_refusals_suspend_the_worker_audited(world: World) -> None:
    threshold = world.settings.worker_suspend_after_refusals
    bad_id, bad = world.token("worker", "liar")
    _, honest = world.token("worker", "honest")
    job_ids = world.jobs(2)
    job = world.lease(bad).json()["job"]
    fencing = job["fencing_token"]
    other = world.lease(honest).json()["job"]
    wrong = {"results": {"sports": {"bits_per_byte": 1.0, "tokens": 3, "bytes": 9}}}
    # Refusals of both kinds count: invalid results of its own job, and a hijack attempt.
    for i in range(threshold - 1):
        problem(
            world.post(bad, job["id"], "complete", {"fencing_token": fencing, "result": wrong}),
            422,
            "invalid_result",
        )
        assert world.token_row(bad_id).refusals == i + 1  # survived the request's 422
    assert world.token_row(bad_id).suspended_at is None
    problem(
        world.post(bad, other["id"], "heartbeat", {"fencing_token": other["fencing_token"]}),
        403,
        "not_lease_holder",
    )
    suspended = world.token_row(bad_id)
    assert suspended.suspended_at is not None
    assert suspended.refusals == threshold
    assert f"{threshold} consecutive refused results" in (suspended.suspension_reason or "")
    assert "another token" in (suspended.suspension_reason or "")
    # Refused on every worker route, before anything is read or staged.
    routes = [
        world.lease(bad),
        world.post(bad, job["id"], "heartbeat", {"fencing_token": fencing}),
        world.post(bad, job["id"], "fail", {"fencing_token": fencing, "release": True}),
        world.post(bad, job["id"], "complete", {"fencing_token": fencing, "result": {}}),
        world.client.get(f"/v1/jobs/{job['id']}", headers=auth(bad)),
    ]
    for answer in routes:
        problem(answer, 403, "token_suspended")
    # Its job went back to the queue at once (this lease not counted); the honest worker
    # is untouched and takes it.
    requeued = world.row(job["id"])
    assert (requeued.status, requeued.attempts, requeued.lease_token_id) == ("queued", 0, None)
    retaken = world.lease(honest).json()["job"]
    assert retaken["id"] == job["id"]
    assert sorted([retaken["id"], other["id"]]) == sorted(job_ids)
    # The audit row: who, why, how many refusals, which jobs were handed back.
    with world.runtime.sessions() as session:
        # Every entry but the tokens' creation (audited too).
        events = session.scalars(
            select(AuditEvent).where(AuditEvent.action != "token.create").order_by(AuditEvent.seq)
        ).all()
    assert [(e.actor, e.action, e.target) for e in events] == [
        ("registry", "token.suspend", f"token:{bad_id}")
    ]
    assert events[0].detail["refusals"] == threshold
    assert events[0].detail["requeued_jobs"] == [job["id"]]
    assert str(threshold) in events[0].detail["reason"]
    # An admin sees it and lifts it (audited); the worker leases again.
    listed = cli("admin", "suspensions")
    assert f"#{bad_id}\tworker\tliar" in listed
    cli("admin", "lift-suspension", str(bad_id), "--note", "rotated the host")
    assert world.token_row(bad_id).suspended_at is None
    assert world.token_row(bad_id).refusals == 0
    assert "no suspended tokens" in cli("admin", "suspensions")
    with world.runtime.sessions() as session:
        lifted = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "token.lift_suspension")
        ).one()
    assert lifted.target == f"token:{bad_id}"
    assert lifted.detail["note"] == "rotated the host"
    assert world.lease(bad).status_code == 204  # authorised again; nothing runnable left
    report(
        "suspension",
        threshold=threshold,
        routes_refused=len(routes),
        requeued=len(events[0].detail["requeued_jobs"]),
        audit_rows=len(events) + 1,
    )
