"""``agora report create|list|show|resolve`` against a real uvicorn on loopback, and the
report routes' Idempotency-Key: a retried report or resolution is applied once
(docs/governance.md, "Reports")."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from helpers.artifacts import make_base_files, make_datasheet, write_expert
from typer.testing import CliRunner

from agora.cli import build_app
from registry.client import Agora


def run(args: list[str], env: dict[str, str]):
    return CliRunner().invoke(build_app(), args, env=env, catch_exceptions=False)


def _setup(live_server, tmp_path: Path) -> tuple[dict[str, str], str]:
    from registry.services.tokens import create_token

    runtime = live_server.app.state.runtime
    tokens = {}
    with runtime.sessions() as session, session.begin():
        for name, role in (("admin", "admin"), ("alice", "contributor"), ("bob", "contributor")):
            tokens[name] = create_token(session=session, name=name, role=role)[1]
        tokens["mod"] = create_token(session=session, name="mod", role="moderator")[1]
    for name, content in make_base_files().items():
        (tmp_path / name).write_bytes(content)
    with Agora(live_server.url, token=tokens["admin"], cache_dir=tmp_path / "c") as agora:
        base = agora.upload_base_model(
            tmp_path / "config.json", tmp_path / "tokenizer.json", tmp_path / "model.safetensors"
        )
        schema = agora.get_base_model(base.revision).expert_schema
    weights = write_expert(tmp_path / "e.safetensors", schema, base_revision=base.revision)
    with Agora(live_server.url, token=tokens["alice"], cache_dir=tmp_path / "a") as agora:
        expert = agora.submit_expert(weights, make_datasheet(name="x").decode(), base.revision)
    return tokens, expert.id


def test_report_cli_round_trip(live_server, tmp_path: Path) -> None:
    tokens, expert = _setup(live_server, tmp_path)
    env = {"AGORA_REGISTRY_URL": live_server.url, "COLUMNS": "80"}
    as_bob = {**env, "AGORA_TOKEN": tokens["bob"]}
    as_mod = {**env, "AGORA_TOKEN": tokens["mod"]}
    evidence = tmp_path / "evidence.txt"
    evidence.write_text("line one of the proof\nline two: the licence forbids it\n")

    filed = run(
        ["report", "create", expert, "--reason", "copied text", "--evidence-file", str(evidence)],
        as_bob,
    )
    assert filed.exit_code == 0, filed.output
    assert f"on {expert}: open" in filed.stdout
    assert "line two: the licence forbids it" in filed.stdout
    report_id = int(filed.stdout.split()[1])

    # A careless user: both evidence options, an unknown status, a missing reason.
    both = run(
        [
            "report",
            "create",
            expert,
            "--reason",
            "r",
            "--evidence",
            "x",
            "--evidence-file",
            str(evidence),
        ],
        as_bob,
    )
    assert both.exit_code == 2
    assert "not both" in both.output
    bad_status = run(["report", "list", "--status", "closed"], as_bob)
    assert bad_status.exit_code == 2
    assert "open, dismissed, disabled" in bad_status.output
    no_reason = run(["report", "create", expert], as_bob)
    assert no_reason.exit_code == 2
    assert "--reason" in no_reason.output

    queue = run(["report", "list"], as_mod)
    assert queue.exit_code == 0, queue.output
    assert expert in queue.stdout
    assert "open" in queue.stdout
    assert max(len(line) for line in queue.stdout.splitlines()) <= 80

    # Alice (neither reporter nor moderator) may not read it, nor resolve it.
    as_alice = {**env, "AGORA_TOKEN": tokens["alice"]}
    assert "[not_reporter]" in run(["report", "show", str(report_id)], as_alice).stderr
    assert run(["report", "resolve", str(report_id), "dismiss"], as_alice).exit_code == 1

    done = run(
        ["report", "resolve", str(report_id), "disable", "--note", "confirmed", "--json"], as_mod
    )
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["status"] == "disabled"
    again = run(["report", "resolve", str(report_id), "dismiss"], as_mod)
    assert again.exit_code == 1
    assert "[report_resolved]" in again.stderr

    outcome = run(["report", "show", str(report_id)], as_bob)
    assert outcome.exit_code == 0, outcome.output
    assert "disabled by mod" in outcome.stdout
    assert "confirmed" in outcome.stdout
    mine = run(["report", "list", "--json"], as_bob)
    assert [r["id"] for r in json.loads(mine.stdout)] == [report_id]


def test_a_retried_report_or_resolution_is_applied_once(live_server, tmp_path: Path) -> None:
    tokens, expert = _setup(live_server, tmp_path)
    bob = {"Authorization": f"Bearer {tokens['bob']}"}
    mod = {"Authorization": f"Bearer {tokens['mod']}"}
    with httpx.Client(base_url=live_server.url) as http:
        url = f"/v1/experts/{expert}/reports"
        body = {"reason": "spam", "evidence": "e"}
        first = http.post(url, json=body, headers={**bob, "Idempotency-Key": "k1"})
        retry = http.post(url, json=body, headers={**bob, "Idempotency-Key": "k1"})
        assert first.status_code == retry.status_code == 201
        assert first.json() == retry.json()
        other = http.post(url, json={"reason": "other"}, headers={**bob, "Idempotency-Key": "k1"})
        assert other.status_code == 409
        assert other.json()["code"] == "idempotency_key_reused"
        mine = http.get("/v1/reports", headers=bob).json()["items"]
        assert [r["id"] for r in mine] == [first.json()["id"]]

        resolve = f"/v1/reports/{first.json()['id']}/resolve"
        answer = {"resolution": "dismiss", "note": "not spam"}
        done = http.post(resolve, json=answer, headers={**mod, "Idempotency-Key": "r1"})
        replay = http.post(resolve, json=answer, headers={**mod, "Idempotency-Key": "r1"})
        assert done.status_code == replay.status_code == 200
        assert done.json() == replay.json()
        assert done.json()["status"] == "dismissed"
        fresh = http.post(resolve, json=answer, headers={**mod, "Idempotency-Key": "r2"})
        assert fresh.status_code == 409
        assert fresh.json()["code"] == "report_resolved"
        bad_key = http.post(url, json=body, headers={**bob, "Idempotency-Key": "k" * 1000})
        assert bad_key.status_code == 400
        assert bad_key.json()["code"] == "invalid_idempotency_key"
