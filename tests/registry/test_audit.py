"""The audit log (docs/governance.md, "Audit log") on SQLite and PostgreSQL: real actions
append a hash chain that a third party re-verifies with the standard library alone;
appends racing through the app stay one linear chain; tampering (behind PostgreSQL's
triggers, which refuse UPDATE, DELETE and TRUNCATE) is found at the right entry; the
listing filters and pages, for moderators and admins only; the tokens API is audited and
a revoked token is refused at once; the migration chains the entries it finds."""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.exc import DBAPIError
from typer.testing import CliRunner

from registry.db.engine import downgrade, make_engine, make_sessionmaker, upgrade
from registry.db.models import UTCDateTime
from registry.services import audit, workers

GENESIS = "0" * 64
ROOT = Path(__file__).resolve().parents[2]


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _docs_recipe() -> dict[str, Any]:
    """The functions docs/governance.md prints under "Verify it yourself" (the standard
    library only): the docs' recipe is the one these tests check the server against."""
    text = (ROOT / "docs" / "governance.md").read_text()
    section = text.split("### Verify it yourself", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(code, "docs/governance.md", "exec"), namespace)
    return namespace


DOCS = _docs_recipe()
rehash = DOCS["entry_hash"]
check_chain = DOCS["check"]


def all_entries(client: TestClient, token: str, **params: Any) -> list[dict[str, Any]]:
    """Every entry matching ``params``, oldest first, following the cursor."""
    found: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = client.get("/v1/audit", params=query, headers=auth(token))
        assert response.status_code == 200, response.text
        page = response.json()
        found.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            return found[::-1]


def verify(client: TestClient, token: str) -> dict[str, Any]:
    response = client.get("/v1/audit/verify", headers=auth(token))
    assert response.status_code == 200, response.text
    return response.json()


def test_governance_actions_append_a_chain_anyone_can_verify(api) -> None:
    client, t = api.client, api.tokens
    submitted = api.submit(weights=api.expert_bytes(seed=1))
    assert submitted.status_code == 201, submitted.text
    expert_id = submitted.json()["id"]
    again = api.submit(weights=api.expert_bytes(seed=2), expert_id=expert_id)
    assert again.status_code == 201, again.text
    for action in ("disable", "enable"):
        done = client.post(
            f"/v1/experts/{expert_id}/{action}",
            json={"reason": f"{action} for review"},
            headers=auth(t.moderator),
        )
        assert done.status_code == 200, done.text
    made = client.post(
        "/v1/tokens", json={"name": "carol", "role": "contributor"}, headers=auth(t.admin)
    )
    assert made.status_code == 201, made.text
    carol_id = made.json()["id"]
    revoked = client.delete(
        f"/v1/tokens/{carol_id}", params={"reason": "left"}, headers=auth(t.admin)
    )
    assert revoked.status_code == 200, revoked.text
    # A worker suspended by the registry and lifted by an operator (the existing callers
    # of workers.audit).
    runtime = api.app.state.runtime
    with runtime.sessions() as session, session.begin():
        worker_id = session.scalar(sa.text("SELECT id FROM tokens WHERE name = 'worker'"))
        assert workers.suspend(
            session=session, token_id=worker_id, reason="3 refusals", actor="registry"
        )
        workers.lift_suspension(session=session, token_id=worker_id, actor="ops", note="ok")

    entries = all_entries(client, t.moderator)
    # The fixture's five tokens first (made by an operator on the database), then the rest.
    assert [(e["actor"], e["action"]) for e in entries[:5]] == [("operator", "token.create")] * 5
    expert = f"expert:{expert_id}"
    assert [(e["actor"], e["action"], e["target"], e["reason"]) for e in entries[5:]] == [
        ("alice", "expert.submit", expert, ""),
        ("alice", "expert.new_version", expert, ""),
        ("moderator", "expert.disable", expert, "disable for review"),
        ("moderator", "expert.enable", expert, "enable for review"),
        ("admin", "token.create", f"token:{carol_id}", ""),
        ("admin", "token.revoke", f"token:{carol_id}", "left"),
        ("registry", "token.suspend", f"token:{worker_id}", "3 refusals"),
        ("ops", "token.lift_suspension", f"token:{worker_id}", "ok"),
    ]
    assert entries[6]["detail"]["version"] == 2
    assert (
        entries[6]["detail"]["digest"]
        == f"sha256:{hashlib.sha256(api.expert_bytes(seed=2)).hexdigest()}"
    )
    assert entries[7]["detail"]["previous_status"] == "active"
    assert entries[9]["detail"]["prefix"] == made.json()["secret"][:12]
    assert made.json()["secret"] not in json.dumps(entries)
    # The chain, re-verified here from the served fields alone.
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    previous = GENESIS
    for entry in entries:
        assert entry["prev_hash"] == previous
        assert rehash(entry) == entry["hash"]
        previous = entry["hash"]
    assert check_chain(entries) == previous
    # The docs' check finds what the server's finds.
    with pytest.raises(ValueError, match="entry 3 was altered"):
        check_chain([*entries[:2], {**entries[2], "reason": "forged"}, *entries[3:]])
    with pytest.raises(ValueError, match="entry 3 is missing"):
        check_chain(entries[:2] + entries[3:])
    times = [dt.datetime.fromisoformat(e["at"]) for e in entries]
    assert times == sorted(times)
    assert verify(client, t.admin) == {
        "ok": True,
        "count": len(entries),
        "head": {"seq": len(entries), "hash": previous},
        "break": None,
    }


def test_the_listing_filters_pages_and_is_for_moderators(client, tokens) -> None:
    for role in ("contributor", "moderator", "worker"):
        made = client.post(
            "/v1/tokens", json={"name": f"n-{role}", "role": role}, headers=auth(tokens.admin)
        )
        assert made.status_code == 201, made.text
    everything = all_entries(client, tokens.admin)
    assert len(everything) == 8
    # Pages of 3: every entry once, newest first.
    pages, cursor = [], None
    while True:
        query = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/audit", params=query, headers=auth(tokens.moderator)).json()
        pages.append([e["seq"] for e in page["items"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == [[8, 7, 6], [5, 4, 3], [2, 1]]

    # Filters, alone and together.
    def seqs(**params: Any) -> list[int]:
        return [e["seq"] for e in all_entries(client, tokens.moderator, **params)]

    assert seqs(actor="admin") == [6, 7, 8]
    assert seqs(actor="admin", target="token:7") == [7]
    assert seqs(action="token.create") == list(range(1, 9))
    assert seqs(action="token.revoke") == []
    split = everything[5]["at"]  # entry 6's time: since is inclusive, until exclusive
    assert seqs(since=split) == [6, 7, 8]
    assert seqs(until=split) == [1, 2, 3, 4, 5]
    assert seqs(actor="admin", since=split, until=everything[7]["at"]) == [6, 7]
    # Bad filters are problems, never a 500.
    for params, code in [
        ({"since": "yesterday"}, "invalid_request"),
        ({"since": "2026-12-01T00:00:00"}, "invalid_time"),
        ({"since": split, "until": split}, "invalid_time_range"),
        ({"limit": 0}, "invalid_request"),
        ({"limit": 101}, "invalid_request"),
        ({"cursor": "not-a-cursor"}, "invalid_cursor"),
        ({"action": "x" * 41}, "invalid_request"),
    ]:
        refused = client.get("/v1/audit", params=params, headers=auth(tokens.moderator))
        assert refused.status_code == 400, (params, refused.text)
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert refused.json()["code"] == code, params
    # Moderators and admins only, the listing and the verification alike.
    for path in ("/v1/audit", "/v1/audit/verify"):
        assert client.get(path).json()["code"] == "missing_token"
        assert client.get(path).status_code == 401
        for token in (tokens.alice, tokens.worker):
            refused = client.get(path, headers=auth(token))
            assert (refused.status_code, refused.json()["code"]) == (403, "insufficient_role")
        assert client.get(path, headers=auth(tokens.moderator)).status_code == 200


def test_concurrent_appends_through_the_app_form_one_linear_chain(client, tokens) -> None:
    threads, per_thread = 8, 3
    statuses: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def make_tokens(n: int) -> None:
        start.wait()
        for i in range(per_thread):
            response = client.post(
                "/v1/tokens",
                json={"name": f"t{n}-{i}", "role": "worker"},
                headers=auth(tokens.admin),
            )
            with lock:
                statuses.append(response.status_code)

    running = [threading.Thread(target=make_tokens, args=(n,)) for n in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join()
    assert statuses == [201] * (threads * per_thread)
    entries = all_entries(client, tokens.admin)
    total = 5 + threads * per_thread
    assert [e["seq"] for e in entries] == list(range(1, total + 1))
    # No fork: every entry names a different predecessor, the one just before it.
    assert len({e["prev_hash"] for e in entries}) == total
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(entries))
    assert verify(client, tokens.admin)["ok"] is True


def test_tampering_is_found_at_the_right_entry(client, tokens, database_url: str) -> None:
    engine = make_engine(database_url)
    postgres = engine.dialect.name == "postgresql"

    def sql(statement: str, **params: Any) -> None:
        with engine.begin() as connection:
            if postgres:  # behind the triggers' back, as only the table's owner can
                connection.execute(sa.text("ALTER TABLE audit_events DISABLE TRIGGER USER"))
            connection.execute(sa.text(statement), params)
            if postgres:
                connection.execute(sa.text("ALTER TABLE audit_events ENABLE TRIGGER USER"))

    try:
        if postgres:
            for statement in (
                "UPDATE audit_events SET reason = 'forged' WHERE seq = 1",
                "DELETE FROM audit_events WHERE seq = 5",
                "DELETE FROM audit_events WHERE false",
                "TRUNCATE audit_events",
            ):
                with pytest.raises(DBAPIError, match="append-only"), engine.begin() as c:
                    c.execute(sa.text(statement))
        entries = all_entries(client, tokens.moderator)
        assert len(entries) == 5
        assert verify(client, tokens.moderator)["ok"]

        # An altered detail: entry 5 no longer hashes to its stored hash.
        as_json = "CAST(:d AS json)" if postgres else ":d"
        sql(f"UPDATE audit_events SET detail = {as_json} WHERE seq = 5", d='{"role": "admin"}')
        report = verify(client, tokens.moderator)
        assert (report["ok"], report["count"]) == (False, 4)
        assert report["head"] == {"seq": 5, "hash": entries[4]["hash"]}
        broken = report["break"]
        assert (broken["seq"], broken["position"], broken["problem"]) == (5, 5, "hash_mismatch")
        assert broken["found"] == entries[4]["hash"]

        # Entry 4 altered with its own hash recomputed: entry 5 no longer names it.
        forged = {**entries[3], "reason": "nothing to see"}
        forged_hash = rehash(forged)
        sql(
            "UPDATE audit_events SET reason = :r, hash = :h WHERE seq = 4",
            r=forged["reason"],
            h=forged_hash,
        )
        broken = verify(client, tokens.moderator)["break"]
        assert (broken["seq"], broken["position"], broken["problem"]) == (
            5,
            5,
            "prev_hash_mismatch",
        )
        assert (broken["expected"], broken["found"]) == (forged_hash, entries[3]["hash"])

        # A deleted entry: the sequence has a gap, found at the entry after it.
        sql("DELETE FROM audit_events WHERE seq = 2")
        report = verify(client, tokens.moderator)
        broken = report["break"]
        assert report["count"] == 1
        assert (broken["seq"], broken["position"], broken["problem"]) == (3, 2, "sequence_gap")
        assert "entry 2 missing" in broken["detail"]
        # The next append still chains on the stored head (entry 5, its hash unchanged).
        late = client.post(
            "/v1/tokens", json={"name": "late", "role": "worker"}, headers=auth(tokens.admin)
        )
        assert late.status_code == 201, late.text
        newest = all_entries(client, tokens.moderator)[-1]
        assert (newest["seq"], newest["prev_hash"]) == (6, entries[4]["hash"])

        if not postgres:
            # SQLite keeps whatever is written, JSON or not: still a break, not a 500.
            sql("UPDATE audit_events SET detail = 'not json' WHERE seq = 1")
            broken = verify(client, tokens.moderator)["break"]
            assert (broken["seq"], broken["position"], broken["problem"]) == (1, 1, "unreadable")
    finally:
        engine.dispose()


def test_tokens_api_is_for_admins_audited_and_refuses_server_fields(client, tokens) -> None:
    admin = auth(tokens.admin)
    made = client.post(
        "/v1/tokens",
        json={"name": "dora", "role": "moderator", "reason": "new moderator"},
        headers=admin,
    )
    assert made.status_code == 201, made.text
    body = made.json()
    secret, dora_id = body["secret"], body["id"]
    assert secret.startswith("agora_")
    assert body["prefix"] == secret[:12]
    assert (body["name"], body["role"], body["trusted"], body["revoked_at"]) == (
        "dora",
        "moderator",
        False,
        None,
    )
    # The secret works at once; the listing never shows a secret or its hash.
    assert client.get("/v1/audit", headers=auth(secret)).status_code == 200
    listed = client.get("/v1/tokens", headers=admin)
    assert listed.status_code == 200
    assert [t["name"] for t in listed.json()["items"]] == [
        "admin",
        "alice",
        "bob",
        "moderator",
        "worker",
        "dora",
    ]
    assert secret not in listed.text
    assert hashlib.sha256(secret.encode()).hexdigest() not in listed.text
    assert set(listed.json()["items"][-1]) == {
        "id",
        "name",
        "role",
        "trusted",
        "prefix",
        "created_at",
        "revoked_at",
        "suspended_at",
    }
    # A body cannot set what the server owns; bad values are problems.
    for extra in (
        {"id": 1},
        {"secret": "agora_" + "A" * 43},
        {"token_hash": "0" * 64},
        {"prefix": "agora_xxxxxx"},
        {"revoked_at": None},
        {"created_at": "2026-01-01T00:00:00Z"},
        {"suspended_at": None},
        {"refusals": 0},
    ):
        refused = client.post(
            "/v1/tokens", json={"name": "eve", "role": "admin", **extra}, headers=admin
        )
        assert refused.status_code == 400, extra
        assert refused.json()["code"] == "invalid_request", extra
    for payload, code in [
        ({"name": "eve", "role": "root"}, "unknown_role"),
        ({"name": "   ", "role": "admin"}, "invalid_name"),
        ({"name": "eve"}, "invalid_request"),
        ({"name": "eve", "role": "admin", "trusted": "yes"}, "invalid_request"),
    ]:
        refused = client.post("/v1/tokens", json=payload, headers=admin)
        assert (refused.status_code, refused.json()["code"]) == (400, code), payload
    # Admins only.
    for method, path in (("POST", "/v1/tokens"), ("GET", "/v1/tokens"), ("DELETE", "/v1/tokens/1")):
        kwargs: dict[str, Any] = (
            {"json": {"name": "x", "role": "admin"}} if method == "POST" else {}
        )
        assert client.request(method, path, **kwargs).status_code == 401
        for token in (tokens.moderator, tokens.alice, tokens.worker):
            refused = client.request(method, path, headers=auth(token), **kwargs)
            assert (refused.status_code, refused.json()["code"]) == (403, "insufficient_role")
    # Revoked: refused on its very next request; a second revocation records nothing.
    gone = client.delete(f"/v1/tokens/{dora_id}", params={"reason": "rotated"}, headers=admin)
    assert gone.status_code == 200
    assert gone.json()["revoked_at"] is not None
    refused = client.get("/v1/audit", headers=auth(secret))
    assert (refused.status_code, refused.json()["code"]) == (401, "invalid_token")
    assert client.delete(f"/v1/tokens/{dora_id}", headers=admin).status_code == 200
    missing = client.delete("/v1/tokens/99999", headers=admin)
    assert (missing.status_code, missing.json()["code"]) == (404, "token_not_found")
    assert client.delete("/v1/tokens/0", headers=admin).json()["code"] == "invalid_request"
    dora = all_entries(client, tokens.admin, target=f"token:{dora_id}")
    assert [(e["actor"], e["action"], e["reason"]) for e in dora] == [
        ("admin", "token.create", "new moderator"),
        ("admin", "token.revoke", "rotated"),
    ]
    assert dora[0]["detail"]["role"] == "moderator"
    assert secret not in json.dumps(all_entries(client, tokens.admin))


def test_cli_lists_and_verifies_over_http(client, tokens, database_url, monkeypatch) -> None:
    import agora.remote
    from agora.cli import build_app
    from registry.client import Agora

    class InProcess(httpx.BaseTransport):
        """The TestClient's app, as a transport the SDK's httpx client takes."""

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            answer = client._transport.handle_request(request)
            body = b"".join(answer.stream)  # type: ignore[union-attr]
            return httpx.Response(answer.status_code, headers=answer.headers, content=body)

    def in_process(url: str, *, token: str | None = None) -> Agora:
        return Agora(url, token=token, transport=InProcess(), max_retries=0)

    monkeypatch.setattr(agora.remote, "Agora", in_process)
    env = {"AGORA_REGISTRY_URL": "http://testserver", "AGORA_TOKEN": tokens.moderator}
    runner = CliRunner()

    def run(*args: str) -> Any:
        return runner.invoke(build_app(), ["admin", *args], env=env)

    listed = run("audit", "--action", "token.create", "--limit", "2")
    assert listed.exit_code == 0, listed.output
    lines = listed.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["#5", "#4"]
    assert lines[0].split("\t")[2:5] == ["operator", "token.create", "token:5"]
    assert "no audit entries" in run("audit", "--target", "expert:ex_none").stdout
    ok = run("audit-verify")
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.startswith("ok: 5 entries"), ok.output
    engine = make_engine(database_url)
    try:
        with engine.begin() as connection:
            if engine.dialect.name == "postgresql":
                connection.execute(sa.text("ALTER TABLE audit_events DISABLE TRIGGER USER"))
            connection.execute(sa.text("UPDATE audit_events SET actor = 'x' WHERE seq = 3"))
            if engine.dialect.name == "postgresql":
                connection.execute(sa.text("ALTER TABLE audit_events ENABLE TRIGGER USER"))
    finally:
        engine.dispose()
    broken = run("audit-verify")
    assert broken.exit_code == 1
    assert "BROKEN at entry 3 (position 3): hash_mismatch" in broken.stdout
    refused = runner.invoke(
        build_app(), ["admin", "audit"], env={**env, "AGORA_TOKEN": tokens.alice}
    )
    assert refused.exit_code == 1
    assert "insufficient_role" in refused.output
    assert "Traceback" not in refused.output


def test_the_migration_chains_the_entries_it_finds(empty_database_url: str) -> None:
    engine = make_engine(empty_database_url)
    old = sa.table(
        "audit_events",
        sa.column("at", UTCDateTime()),
        sa.column("actor", sa.String()),
        sa.column("action", sa.String()),
        sa.column("subject", sa.String()),
        sa.column("detail", sa.JSON()),
    )
    at = dt.datetime(2026, 12, 4, 9, 30, 0, 123456, tzinfo=dt.UTC)
    try:
        upgrade(engine, "0004")
        with engine.begin() as connection:
            connection.execute(
                old.insert(),
                [
                    {
                        "at": at + dt.timedelta(seconds=i),
                        "actor": "registry",
                        "action": "token.suspend",
                        "subject": f"token:{i}",
                        "detail": {"reason": "é", "refusals": i, "requeued_jobs": []},
                    }
                    for i in range(3)
                ],
            )
        upgrade(engine)
        sessions = make_sessionmaker(engine)
        with sessions() as session, session.begin():
            report = audit.verify(session=session)
            assert (report.ok, report.count, report.head_seq) == (True, 3, 3)
            rows = [audit.entry_view(r) for r in audit.list_entries(session=session)[0]]
            assert [r["target"] for r in rows] == ["token:2", "token:1", "token:0"]
            assert rows[-1]["at"] == "2026-12-04T09:30:00.123456Z"
            assert all(rehash(r) == r["hash"] for r in rows)
            audit.append(session, actor="ops", action="token.create", target="token:9")
        with sessions() as session, session.begin():
            assert audit.verify(session=session).count == 4
        if engine.dialect.name == "postgresql":
            with pytest.raises(DBAPIError, match="append-only"), engine.begin() as c:
                c.execute(sa.text("UPDATE audit_events SET actor = 'x'"))
        # Downgrade removes the triggers and the chain's columns; the entries stay.
        downgrade(engine, "0004")
        with engine.begin() as connection:
            connection.execute(sa.text("UPDATE audit_events SET actor = 'x' WHERE id = 1"))
            columns = {c["name"] for c in sa.inspect(connection).get_columns("audit_events")}
            assert columns == {"id", "at", "actor", "action", "subject", "detail"}
            assert connection.scalar(sa.text("SELECT count(*) FROM audit_events")) == 4
    finally:
        engine.dispose()
