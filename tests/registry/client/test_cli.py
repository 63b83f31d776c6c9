"""``agora expert submit|list|download`` against the app served by a real uvicorn on loopback."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers.artifacts import make_base_files, make_datasheet, write_expert
from typer.testing import CliRunner

from agora.cli import build_app
from registry.client import Agora


@dataclass(frozen=True)
class Setup:
    url: str
    alice: str
    admin: str
    revision: str
    schema: dict
    env: dict[str, str]


@pytest.fixture
def setup(live_server, tmp_path: Path) -> Setup:
    from registry.services.tokens import create_token

    runtime = live_server.app.state.runtime
    with runtime.sessions() as session, session.begin():
        _, admin = create_token(session=session, name="admin", role="admin")
        _, alice = create_token(session=session, name="alice", role="contributor")
    files = make_base_files()
    directory = tmp_path / "base"
    directory.mkdir()
    for name, content in files.items():
        (directory / name).write_bytes(content)
    with Agora(live_server.url, token=admin, cache_dir=tmp_path / "admin-cache") as agora:
        base = agora.upload_base_model(
            directory / "config.json", directory / "tokenizer.json", directory / "model.safetensors"
        )
    schema = json.loads(files["config.json"])["expert_schema"]
    env = {
        "AGORA_REGISTRY_URL": live_server.url,
        "AGORA_TOKEN": alice,
        "AGORA_CACHE_DIR": str(tmp_path / "cli-cache"),
    }
    return Setup(live_server.url, alice, admin, base.revision, schema, env)


def run(args: list[str], env: dict[str, str]):
    return CliRunner().invoke(build_app(), args, env=env, catch_exceptions=False)


def test_submit_list_download(setup: Setup, tmp_path: Path) -> None:
    weights = write_expert(
        tmp_path / "expert.safetensors", setup.schema, base_revision=setup.revision
    )
    sheet = tmp_path / "DATASHEET.md"
    sheet.write_bytes(make_datasheet(name="Tide pools"))

    submitted = run(
        ["expert", "submit", str(weights), "--datasheet", str(sheet), "--base", setup.revision],
        setup.env,
    )
    assert submitted.exit_code == 0, submitted.output
    line = next(x for x in submitted.stdout.splitlines() if x.startswith("submitted "))
    expert_id = line.split()[1]
    assert expert_id.startswith("ex_")
    assert "version 1" in line

    listed = run(["expert", "list", "--json", "--base", setup.revision], setup.env)
    assert listed.exit_code == 0, listed.output
    rows = [json.loads(x) for x in listed.stdout.splitlines()]
    assert [(r["id"], r["name"]) for r in rows] == [(expert_id, "Tide pools")]

    table = run(["expert", "list", "-q", "tide"], setup.env)
    assert expert_id in table.stdout

    out = tmp_path / "downloaded.safetensors"
    downloaded = run(["expert", "download", expert_id, "--out", str(out)], setup.env)
    assert downloaded.exit_code == 0, downloaded.output
    assert downloaded.stdout.strip().splitlines()[-1] == str(out)
    assert out.read_bytes() == weights.read_bytes()


def test_errors_are_one_line_with_code_and_exit_1(setup: Setup, tmp_path: Path) -> None:
    missing = run(["expert", "download", "ex_00000000000000000000000000"], setup.env)
    assert missing.exit_code == 1
    assert "[expert_not_found]" in missing.stderr
    assert "HTTP 404" in missing.stderr
    assert "Traceback" not in missing.output

    weights = write_expert(tmp_path / "e.safetensors", setup.schema, base_revision=setup.revision)
    sheet = tmp_path / "DATASHEET.md"
    sheet.write_bytes(make_datasheet())
    no_token = {**setup.env, "AGORA_TOKEN": ""}
    refused = run(
        ["expert", "submit", str(weights), "--datasheet", str(sheet), "--base", setup.revision],
        no_token,
    )
    assert refused.exit_code == 1
    assert "HTTP 401" in refused.stderr

    bad_sheet = tmp_path / "bad.md"
    bad_sheet.write_text("no front matter here\n")
    invalid = run(
        [
            "expert",
            "submit",
            str(weights),
            "--datasheet",
            str(bad_sheet),
            "--base",
            setup.revision,
            "--token",
            setup.alice,
        ],
        no_token,
    )
    assert invalid.exit_code == 1
    assert "[datasheet_front_matter]" in invalid.stderr or "[datasheet_invalid]" in invalid.stderr


def test_unreachable_registry_is_a_transport_error(tmp_path: Path, monkeypatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr("registry.client.client.time.sleep", slept.append)
    env = {"AGORA_REGISTRY_URL": "http://127.0.0.1:9", "AGORA_CACHE_DIR": str(tmp_path)}
    # Port 9 (discard) is closed on loopback: refused at once, retried, then one error line.
    result = run(["expert", "list", "--registry", "http://127.0.0.1:9"], env)
    assert result.exit_code == 1
    assert "[transport_error]" in result.stderr
    assert len(slept) == 3  # the default max_retries


def test_docs_sdk_snippet_runs_as_written(setup: Setup, tmp_path: Path, monkeypatch) -> None:
    """The ten-line example in docs/sdk.md (the README's) works against a real server."""
    docs = Path(__file__).resolve().parents[3] / "docs" / "sdk.md"
    text = docs.read_text()
    snippet = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'Agora("http://127.0.0.1:8000", token="agora_...")' in snippet
    snippet = snippet.replace("http://127.0.0.1:8000", setup.url).replace(
        '"agora_..."', repr(setup.alice)
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AGORA_CACHE_DIR", str(tmp_path / "snippet-cache"))
    write_expert(tmp_path / "expert.safetensors", setup.schema, base_revision=setup.revision)
    (tmp_path / "datasheet.md").write_bytes(make_datasheet(domain="Tide pools and rock shores"))

    exec(compile(snippet, str(docs), "exec"), {"__name__": "snippet"})

    assert (tmp_path / "downloaded.safetensors").read_bytes() == (
        tmp_path / "expert.safetensors"
    ).read_bytes()


def test_a_datasheet_schema_failure_names_each_field(setup: Setup, tmp_path: Path) -> None:
    weights = write_expert(tmp_path / "e.safetensors", setup.schema, base_revision=setup.revision)
    sheet = tmp_path / "DATASHEET.md"
    sheet.write_bytes(make_datasheet(contact=None, sources=None, license=None))
    refused = run(
        ["expert", "submit", str(weights), "--datasheet", str(sheet), "--base", setup.revision],
        setup.env,
    )
    assert refused.exit_code == 1
    assert "[datasheet_invalid]" in refused.stderr
    fields = [line.strip() for line in refused.stderr.splitlines() if line.strip().startswith("-")]
    # One line per field, each with its path: never the same message without a place.
    assert fields == [
        "- $.contact: required key is missing",
        "- $.license: required key is missing",
        "- $.sources: required key is missing",
    ]


def test_field_errors_are_described_with_their_place() -> None:
    from agora.remote import describe_field_error, field_lines

    assert describe_field_error({"path": "$.contact", "message": "required"}) == (
        "$.contact: required"
    )
    assert describe_field_error({"tensor": "layers.0.w", "detail": "bad dtype"}) == (
        "layers.0.w: bad dtype"
    )
    assert describe_field_error({"loc": ["body", "k"], "msg": "too big"}) == "body.k: too big"
    assert describe_field_error({"message": "no place"}) == "no place"
    many = field_lines([{"path": f"$.x{i}", "message": "m"} for i in range(25)])
    assert len(many) == 21
    assert many[-1] == "... and 5 more"


def _long_named_expert(setup: Setup, tmp_path: Path) -> str:
    weights = write_expert(tmp_path / "e.safetensors", setup.schema, base_revision=setup.revision)
    sheet = tmp_path / "DATASHEET.md"
    sheet.write_bytes(
        make_datasheet(
            name="Tide-pool ecology field notes of the North Pacific coast, 2019-2024",
            domain="Field notes, survey logs and short articles about rocky intertidal "
            "ecology: species observations, tide and temperature records, predation.",
        )
    )
    submitted = run(
        ["expert", "submit", str(weights), "--datasheet", str(sheet), "--base", setup.revision],
        setup.env,
    )
    assert submitted.exit_code == 0, submitted.output
    return next(x for x in submitted.stdout.splitlines() if x.startswith("submitted ")).split()[1]


def test_tables_keep_their_numbers_at_80_columns(setup: Setup, tmp_path: Path) -> None:
    expert_id = _long_named_expert(setup, tmp_path)
    narrow = {**setup.env, "COLUMNS": "80"}

    listed = run(["expert", "list"], narrow)
    assert listed.exit_code == 0, listed.output
    assert all(len(line) <= 80 for line in listed.stdout.splitlines())
    (row,) = [line for line in listed.stdout.splitlines() if expert_id in line]
    cells = [cell.strip() for cell in row.strip("│ ").split("│")]
    assert cells[0] == expert_id
    assert cells[-3:] == ["active", "1", setup.revision[:8]]
    assert cells[1].startswith("Tide")
    assert cells[1].endswith("…")  # the name gives way

    found = run(["search", "sea stars on the mussel beds at low tide", "-k", "1"], narrow)
    assert found.exit_code == 0, found.output
    assert all(len(line) <= 80 for line in found.stdout.splitlines())
    (row,) = [line for line in found.stdout.splitlines() if expert_id in line]
    cells = [cell.strip() for cell in row.strip("│ ").split("│")]
    assert cells[:3] == [expert_id, "1", "1.000"]
    assert float(cells[3]) > 0


def test_search_and_compose_guess_the_only_base_and_list_several(
    setup: Setup, tmp_path: Path
) -> None:
    expert_id = _long_named_expert(setup, tmp_path)
    # One base on the registry: --base may be left out (search, as compose always did).
    guessed = run(["search", "tide pools", "--json"], setup.env)
    assert guessed.exit_code == 0, guessed.output
    assert json.loads(guessed.stdout)["results"][0]["expert_id"] == expert_id

    # A second base: leaving --base out is a usage error that lists both revisions.
    other = make_base_files(seed=1)
    directory = tmp_path / "other-base"
    directory.mkdir()
    for name, content in other.items():
        (directory / name).write_bytes(content)
    admin_env = {**setup.env, "AGORA_TOKEN": setup.admin}
    uploaded = run(["base", "upload", str(directory)], admin_env)
    assert uploaded.exit_code == 0, uploaded.output
    second = uploaded.stdout.strip().splitlines()[-1]
    assert second != setup.revision
    listed = run(["base", "list"], setup.env)
    assert listed.exit_code == 0, listed.output
    assert {line.split()[0] for line in listed.stdout.splitlines()} == {setup.revision, second}
    wide = {**setup.env, "COLUMNS": "400"}  # the usage error's box never wraps a revision
    for args in (
        ["search", "tide pools"],
        ["compose", "--experts", expert_id, "--out", str(tmp_path / "c")],
    ):
        refused = run(args, wide)
        assert refused.exit_code == 2, refused.output
        assert "the registry has 2 base models, name one" in refused.output
        assert "--base" in refused.output
        assert setup.revision in refused.output
        assert second in refused.output
    assert not (tmp_path / "c").exists()
