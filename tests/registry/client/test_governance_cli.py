"""The CLI never hands out a withdrawn expert from its cache: ``agora expert download``
revalidates with the registry each time (docs/governance.md, "Downloads and the local
cache"); ``agora expert withdraw|restore`` by the owner. Against a real uvicorn on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.artifacts import make_base_files, make_datasheet, write_expert
from typer.testing import CliRunner

from agora.cli import build_app
from registry.client import Agora


def run(args: list[str], env: dict[str, str]):
    return CliRunner().invoke(build_app(), args, env=env, catch_exceptions=False)


def test_download_revalidates_the_cache_and_owners_withdraw(live_server, tmp_path: Path) -> None:
    from registry.services.tokens import create_token

    runtime = live_server.app.state.runtime
    with runtime.sessions() as session, session.begin():
        _, admin = create_token(session=session, name="admin", role="admin")
        _, alice = create_token(session=session, name="alice", role="contributor")
        _, bob = create_token(session=session, name="bob", role="contributor")
    files = make_base_files()
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    with Agora(live_server.url, token=admin, cache_dir=tmp_path / "admin-cache") as agora:
        base = agora.upload_base_model(
            tmp_path / "config.json", tmp_path / "tokenizer.json", tmp_path / "model.safetensors"
        )
        schema = agora.get_base_model(base.revision).expert_schema
    weights = write_expert(tmp_path / "e.safetensors", schema, base_revision=base.revision)
    with Agora(live_server.url, token=alice, cache_dir=tmp_path / "a") as agora:
        x = agora.submit_expert(weights, make_datasheet(name="x").decode(), base.revision).id
    with Agora(live_server.url, token=bob, cache_dir=tmp_path / "b") as agora:
        y = agora.submit_expert(weights, make_datasheet(name="y").decode(), base.revision).id
    env = {"AGORA_REGISTRY_URL": live_server.url, "AGORA_CACHE_DIR": str(tmp_path / "cache")}
    as_alice = {**env, "AGORA_TOKEN": alice}

    for expert_id in (x, y):
        first = run(["expert", "download", expert_id], env)
        assert first.exit_code == 0, first.output
        assert Path(first.stdout.strip().splitlines()[-1]).read_bytes() == weights.read_bytes()

    # The owner withdraws x: the cached bytes are not handed out for x any more.
    withdrawn = run(["expert", "withdraw", x, "--reason", "consent withdrawn"], as_alice)
    assert withdrawn.exit_code == 0, withdrawn.output
    assert f"{x} is withdrawn" in withdrawn.stdout
    refused = run(["expert", "download", x], env)
    assert refused.exit_code == 1, refused.output
    assert "[expert_disabled]" in refused.stderr
    assert "Traceback" not in refused.output
    assert run(["expert", "restore", x], as_alice).exit_code == 0
    assert run(["expert", "download", x], env).exit_code == 0

    # A moderator disables x: y, active with the same weights and cached, is refused too.
    with Agora(live_server.url, token=admin, cache_dir=tmp_path / "admin-cache") as agora:
        agora.disable_expert(x, "stolen weights")
    for expert_id, code in ((x, "expert_disabled"), (y, "digest_disabled")):
        again = run(["expert", "download", expert_id], env)
        assert again.exit_code == 1, (expert_id, again.output)
        assert f"[{code}]" in again.stderr
        assert x in again.stderr
    not_owner = run(["expert", "withdraw", y], as_alice)
    assert not_owner.exit_code == 1
    assert "[not_owner]" in not_owner.stderr


def test_sdk_reports_round_trip(make_agora, tokens, base, tmp_path: Path) -> None:
    from registry.client import UnavailableForLegalReasons

    alice, bob, moderator = (make_agora(t) for t in (tokens.alice, tokens.bob, tokens.moderator))
    weights = write_expert(tmp_path / "e.safetensors", base.schema, base_revision=base.revision)
    expert = alice.submit_expert(weights, make_datasheet().decode(), base.revision).id
    report = bob.reports.create(expert, "copied", evidence="see page 3")
    assert (report.status, report.reporter, report.evidence) == ("open", "bob", "see page 3")
    assert [r.id for r in moderator.reports.list()] == [report.id]
    done = moderator.reports.resolve(report.id, "disable", note="confirmed")
    assert (done.status, done.resolution) == ("disabled", "confirmed")
    assert bob.reports.get(report.id).status == "disabled"
    with pytest.raises(UnavailableForLegalReasons) as refused:
        bob.download(expert)
    assert refused.value.code == "expert_disabled"
