"""``agora expert forgetting ID``: an expert's forgetting reports as a table at 80 columns
and as JSON (docs/governance.md, "Proof of forgetting"), against a real uvicorn on
loopback. The test plays the worker with made-up numbers: what is printed is the subject
here (tests/registry/test_forgetting.py measures real ones)."""

from __future__ import annotations

import json
from pathlib import Path

from helpers.artifacts import make_base_files, make_datasheet, write_expert
from typer.testing import CliRunner

from agora.cli import build_app
from registry.client import Agora


def run(args: list[str], env: dict[str, str]):
    return CliRunner().invoke(build_app(), args, env=env, catch_exceptions=False)


def test_the_cli_prints_the_reports_at_80_columns_and_as_json(live_server, tmp_path: Path) -> None:
    from registry.services.tokens import create_token

    runtime = live_server.app.state.runtime
    with runtime.sessions() as session, session.begin():
        _, admin = create_token(session=session, name="admin", role="admin")
        _, alice = create_token(session=session, name="alice", role="contributor")
        _, worker = create_token(session=session, name="worker", role="worker", trusted=True)
    files = make_base_files()
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    with Agora(live_server.url, token=admin, cache_dir=tmp_path / "admin") as agora:
        base = agora.upload_base_model(
            tmp_path / "config.json", tmp_path / "tokenizer.json", tmp_path / "model.safetensors"
        )
        schema = agora.get_base_model(base.revision).expert_schema
    weights = write_expert(tmp_path / "e.safetensors", schema, base_revision=base.revision)
    sheet = make_datasheet(name="x", samples=["one held-out passage"]).decode()
    with Agora(live_server.url, token=alice, cache_dir=tmp_path / "a") as agora:
        expert = agora.submit_expert(weights, sheet, base.revision).id
    env = {"AGORA_REGISTRY_URL": live_server.url, "COLUMNS": "80"}

    none = run(["expert", "forgetting", expert], env)
    assert none.exit_code == 0
    assert "no forgetting reports" in none.stdout
    with Agora(live_server.url, token=admin, cache_dir=tmp_path / "admin") as agora:
        agora.disable_expert(expert, "copied text")
    pending = run(["expert", "forgetting", expert], env)
    assert pending.exit_code == 0, pending.output
    assert "the expert alone (expert; without: base) v1: pending" in pending.stdout

    with Agora(live_server.url, token=worker, cache_dir=tmp_path / "w") as agora:
        leased = None
        while leased is None or leased.payload.get("purpose") != "forgetting":
            leased = agora.lease_job("w", None, 60)
            assert leased is not None
        score = {
            "bits_per_byte": 1.5,
            "base_bits_per_byte": 2.0,
            "without_bits_per_byte": 2.0,
            "tokens": 5,
            "bytes": 20,
        }
        agora.complete_job(leased.id, leased.fencing_token, {"results": {"domain": score}})

    table = run(["expert", "forgetting", expert], env)
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), table.stdout
    assert "ready" in lines[0]
    row = next(line for line in lines if "domain" in line)
    assert "1.5000" in row
    assert "2.0000" in row
    assert "+0.00%" in row

    as_json = run(["expert", "forgetting", expert, "--json"], env)
    (report,) = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert report["status"] == "ready"
    assert report["domain"]["with"] == 1.5
    assert report["domain"]["without_vs_base"] == 0.0
    assert report["domain"]["with_vs_base"] == -0.25
