"""``agora admin text-sets`` and ``agora admin monitor`` against a real uvicorn on
loopback (docs/governance.md, "Monitoring")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.artifacts import make_base_files, make_datasheet, write_expert
from typer.testing import CliRunner

from agora.cli import build_app
from registry.client import Agora
from registry.settings import Settings


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "agora", database_url=database_url, arrival_checks=False)


def run(args: list[str], env: dict[str, str]):
    return CliRunner().invoke(
        build_app(), args, env={**env, "COLUMNS": "80"}, catch_exceptions=False
    )


def table_row(output: str, first: str) -> list[str]:
    """The cells of the table row whose first cell is ``first``."""
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("│┃").split("│")]
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in:\n{output}")


def test_upload_list_schedule_and_cancel(live_server, tmp_path: Path) -> None:
    from registry.services.tokens import create_token

    runtime = live_server.app.state.runtime
    with runtime.sessions() as session, session.begin():
        _, admin = create_token(session=session, name="admin", role="admin")
        _, moderator = create_token(session=session, name="mod", role="moderator")
        _, alice = create_token(session=session, name="alice", role="contributor")
    files = make_base_files()
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    with Agora(live_server.url, token=admin, cache_dir=tmp_path / "c") as agora:
        base = agora.upload_base_model(
            tmp_path / "config.json", tmp_path / "tokenizer.json", tmp_path / "model.safetensors"
        )
        schema = agora.get_base_model(base.revision).expert_schema
    weights = write_expert(tmp_path / "e.safetensors", schema, base_revision=base.revision)
    with Agora(live_server.url, token=alice, cache_dir=tmp_path / "a") as agora:
        expert = agora.submit_expert(weights, make_datasheet(name="x").decode(), base.revision)
    env = {"AGORA_REGISTRY_URL": live_server.url, "AGORA_TOKEN": moderator}

    (tmp_path / "news").mkdir()
    (tmp_path / "news" / "a.txt").write_text("First story.")
    lines = [json.dumps({"text": "Second story."}), json.dumps({"text": "Third story."})]
    (tmp_path / "more.jsonl").write_text("\n".join(lines) + "\n")
    args = ["admin", "text-sets", "upload", "--name", "news", "--date", "2026-12-01"]
    made = run([*args, str(tmp_path / "news"), str(tmp_path / "more.jsonl")], env)
    assert made.exit_code == 0, made.output
    assert "news@2026-12-01: 3 texts" in made.stdout
    with Agora(live_server.url, token=moderator, cache_dir=tmp_path / "m") as agora:
        (made_set,) = agora.monitoring.text_sets("news")
    again = run([*args, str(tmp_path / "more.jsonl")], env)
    assert again.exit_code == 1
    assert "[text_set_exists]" in again.stderr
    refused = run([*args, str(tmp_path / "more.jsonl")], {**env, "AGORA_TOKEN": alice})
    assert refused.exit_code == 1
    assert "[insufficient_role]" in refused.stderr
    listed = run(["admin", "text-sets", "list"], env)
    assert listed.exit_code == 0, listed.output
    assert table_row(listed.stdout, str(made_set.id))[1:5] == [
        "news@2026-12-01",
        "3",
        str(made_set.bytes),
        "mod",
    ]
    as_json = json.loads(run(["admin", "text-sets", "list", "--json"], env).stdout)
    assert [(s["key"], s["n_texts"]) for s in as_json] == [("news@2026-12-01", 3)]

    later = "2999-01-01T00:00:00+00:00"
    scheduled = run(
        ["admin", "monitor", "schedule", "--not-before", later, "--every-hours", "24"], env
    )
    assert scheduled.exit_code == 0, scheduled.output
    assert "schedule #1: 1 expert(s) from 2999-01-01T00:00:00Z, every 24.0 h" in scheduled.stdout
    schedules = run(["admin", "monitor", "list"], env)
    assert table_row(schedules.stdout, "1")[:6] == [
        "1",
        "2999-01-01 00:00",
        "24 h",
        "0/1",
        "0",
        "active",
    ]
    queued = run(["admin", "monitor", "runs"], env)
    assert table_row(queued.stdout, f"{expert.id}@1")[1:5] == [
        "-",
        "-",
        "queued",
        "2999-01-01 00:00",
    ]
    runs_json = json.loads(run(["admin", "monitor", "runs", "--json"], env).stdout)
    assert [(r["expert_id"], r["completed_at"]) for r in runs_json] == [(expert.id, None)]
    # Every list fits an 80-column terminal (COLUMNS=80; --json has every field).
    for output in (listed.stdout, schedules.stdout, queued.stdout):
        assert max(len(line) for line in output.splitlines()) <= 80, output
    cancelled = run(["admin", "monitor", "cancel", "1"], env)
    assert "cancelled schedule #1 and 1 queued job(s)" in cancelled.stdout
    after = run(["admin", "monitor", "list", "--json"], env)
    assert [s["cancelled_by"] for s in json.loads(after.stdout)] == ["mod"]
    bad = run(["admin", "monitor", "schedule", "--not-before", "yesterday"], env)
    assert bad.exit_code == 2
