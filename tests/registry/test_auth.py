"""Bearer-token auth: 401 for no or unknown credentials, 403 for the wrong role."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from registry.db.models import Token


def test_write_without_token_is_401_with_challenge(api) -> None:
    response = api.client.post("/v1/experts", files={"weights": ("w", b"x")})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["code"] == "missing_token"
    assert api.leftovers().staging_files == []


@pytest.mark.parametrize(
    ("header", "code"),
    [
        ("Bearer agora_not-a-real-token", "invalid_token"),
        ("Bearer something-else", "invalid_token"),
        ("Basic dXNlcjpwYXNz", "invalid_authorization"),
    ],
)
def test_bad_credentials_are_401(api, header, code) -> None:
    response = api.client.post("/v1/experts", headers={"Authorization": header})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["code"] == code


def test_bad_credentials_on_a_public_read_are_still_401(api) -> None:
    response = api.client.get("/v1/experts", headers={"Authorization": "Bearer agora_wrong"})
    assert response.status_code == 401


@pytest.mark.parametrize("who", ["moderator", "worker"])
def test_roles_that_cannot_submit_get_403(api, who) -> None:
    response = api.submit(getattr(api.tokens, who))
    assert response.status_code == 403
    assert response.json()["code"] == "insufficient_role"
    assert api.leftovers().experts == 0


def test_contributor_cannot_upload_a_base_model(api) -> None:
    response = api.client.post(
        "/v1/base-models", files={"config": ("c", b"{}")}, headers=api.auth(api.tokens.alice)
    )
    assert response.status_code == 403
    assert response.json()["code"] == "insufficient_role"


def test_tokens_are_stored_hashed(api) -> None:
    with api.app.state.runtime.sessions() as session:
        rows = session.scalars(select(Token)).all()
    secret = api.tokens.alice
    alice = next(row for row in rows if row.name == "alice")
    assert alice.token_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert secret.startswith(alice.prefix)
    for row in rows:
        assert secret not in (row.token_hash, row.prefix, row.name)


def test_cli_create_token_prints_a_working_token_last(
    database_url, tmp_path, monkeypatch, client, app, base
) -> None:
    from agora.cli import build_app

    monkeypatch.setenv("AGORA_DATABASE_URL", database_url)
    monkeypatch.setenv("AGORA_DATA_DIR", str(tmp_path / "cli"))
    result = CliRunner().invoke(
        build_app(), ["admin", "create-token", "--role", "contributor", "--name", "carol"]
    )
    assert result.exit_code == 0, result.output
    token = result.output.strip().splitlines()[-1]
    assert token.startswith("agora_")
    response = client.post(
        "/v1/experts",
        files={"datasheet": ("d.md", b"x")},
        data={"base_revision": base.revision},
        headers={"Authorization": f"Bearer {token}"},
    )
    # Authenticated and authorised: the request got as far as form checking.
    assert response.status_code == 400
    assert response.json()["code"] == "missing_field"


def test_cli_create_token_refuses_unknown_role(database_url, tmp_path, monkeypatch) -> None:
    from agora.cli import build_app

    monkeypatch.setenv("AGORA_DATABASE_URL", database_url)
    monkeypatch.setenv("AGORA_DATA_DIR", str(tmp_path / "cli"))
    result = CliRunner().invoke(
        build_app(), ["admin", "create-token", "--role", "emperor", "--name", "x"]
    )
    assert result.exit_code == 2
    assert "unknown role" in result.output


def test_revoked_token_is_401_at_once(database_url, tmp_path, monkeypatch, api) -> None:
    from agora.cli import build_app

    monkeypatch.setenv("AGORA_DATABASE_URL", database_url)
    monkeypatch.setenv("AGORA_DATA_DIR", str(tmp_path / "cli"))
    runner = CliRunner()
    assert api.submit(api.tokens.bob).status_code == 201
    listing = runner.invoke(build_app(), ["admin", "list-tokens"])
    assert listing.exit_code == 0, listing.output
    bob_line = next(line for line in listing.output.splitlines() if "\tbob\t" in line)
    assert api.tokens.bob not in listing.output  # only prefixes are ever shown
    token_id = bob_line.split("\t")[0].lstrip("#")
    revoked = runner.invoke(build_app(), ["admin", "revoke-token", token_id])
    assert revoked.exit_code == 0, revoked.output
    response = api.submit(api.tokens.bob, weights=api.expert_bytes(seed=3))
    assert response.status_code == 401
    assert response.json()["code"] == "invalid_token"
    assert api.submit(api.tokens.alice, weights=api.expert_bytes(seed=4)).status_code == 201
    missing = runner.invoke(build_app(), ["admin", "revoke-token", "99999"])
    assert missing.exit_code == 2
