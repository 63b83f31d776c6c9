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


# -- a credential that is sent and fails is refused on every route ----------------------------

BASIC = "Basic dXNlcjpwYXNz"


@pytest.fixture
def settings(database_url, tmp_path):
    from registry.settings import Settings

    # The walk below sends a few hundred requests at once: rate limits are not its subject.
    return Settings(
        data_dir=tmp_path / "agora",
        database_url=database_url,
        rate_limit_anonymous_per_second=0,
        rate_limit_token_per_second=0,
        rate_limit_search_per_second=0,
    )


def _bad_credentials(api) -> dict[str, tuple[list[tuple[str, str]], str]]:
    """Each kind of failing credential: the Authorization header(s) sent, and the code."""
    from registry.services.tokens import create_token, revoke_token

    with api.app.state.runtime.sessions() as session, session.begin():
        row, revoked = create_token(session=session, name="carol", role="contributor")
        revoke_token(session=session, token_id=row.id)
    return {
        "revoked": ([("Authorization", f"Bearer {revoked}")], "invalid_token"),
        "unknown": ([("Authorization", "Bearer agora_not-a-real-token")], "invalid_token"),
        "garbage": (
            [("Authorization", "Bearer \u00e9t\u00e9 ../..".encode("latin-1"))],
            "invalid_token",
        ),
        "basic": ([("Authorization", BASIC)], "invalid_authorization"),
        "scheme-less": ([("Authorization", api.tokens.alice)], "invalid_authorization"),
        "empty bearer": ([("Authorization", "Bearer ")], "invalid_authorization"),
        "two headers": (
            [("Authorization", f"Bearer {api.tokens.alice}"), ("Authorization", BASIC)],
            "invalid_authorization",
        ),
    }


def _path_values(api) -> dict[str, str]:
    """A real value for every path parameter of the app, so that each route would answer
    without credentials (an expert, a composition, its job, a base file)."""
    from helpers.artifacts import make_datasheet

    ids = []
    for seed, name in [(1, "alpha"), (2, "beta")]:
        response = api.submit(
            weights=api.expert_bytes(seed=seed),
            datasheet=make_datasheet(name=name, samples=[f"{name} sample text"]),
        )
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    a, b = ids
    queued = api.client.post(
        "/v1/compositions",
        json={"base_revision": api.base.revision, "method": "average", "experts": [a, b]},
        headers=api.auth(api.tokens.alice),
    )
    assert queued.status_code == 202, queued.text
    return {
        "revision": api.base.revision,
        "field": "config",
        "expert_id": a,
        "composition_id": queued.json()["composition_id"],
        "job_id": queued.json()["job_id"],
        "token_id": "1",  # the admin's (tests/registry/conftest.py makes it first)
        "report_id": "1",
        "text_set_id": "1",
        "schedule_id": "1",
    }


def _routes(app, methods: set[str]):
    from registry.api.openapi import api_routes

    for route in api_routes(app.routes):
        for method in sorted(route.methods & methods):
            yield method, route


def test_every_route_refuses_every_kind_of_failing_credential(api) -> None:
    """Walks app.routes: a route added later is covered without editing this test."""
    values = _path_values(api)
    bad = _bad_credentials(api)
    walked = set()
    for method, route in _routes(api.app, {"GET", "HEAD", "OPTIONS", "POST"}):
        missing = set(route.param_convertors) - set(values)
        assert not missing, f"{route.path}: give this test a value for {missing}"
        url = route.path_format.format(**values)
        anonymous = api.client.request(method, url)
        if method != "POST":
            # The route serves (or refuses for want of a token): a credential is what
            # changes the answer below, nothing else.
            assert anonymous.status_code < 500, (method, url, anonymous.text)
        for kind, (headers, code) in bad.items():
            response = api.client.request(method, url, headers=headers)
            where = f"{method} {url} with a {kind} credential"
            assert response.status_code == 401, (where, response.status_code, response.text)
            assert response.headers["www-authenticate"].startswith("Bearer"), where
            assert response.headers["content-type"] == "application/problem+json", where
            if method != "HEAD":
                assert response.json()["code"] == code, (where, response.text)
        walked.add((method, route.path))
    gets = {path for method, path in walked if method == "GET"}
    # The public reads the probe found answering 200 to bad credentials, probes and docs.
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/docs",
        "/openapi.json",
        "/v1/base-models",
        "/v1/base-models/{revision}",
        "/v1/base-models/{revision}/files/{field}",
        "/v1/experts/{expert_id}",
        "/v1/experts/{expert_id}/versions",
        "/v1/experts/{expert_id}/datasheet",
        "/v1/experts/{expert_id}/weights",
        "/v1/experts/{expert_id}/evaluations",
        "/v1/compositions/{composition_id}",
        "/v1/compositions/{composition_id}/evaluations",
    ]:
        assert path in gets, path
    assert ("HEAD", "/v1/experts/{expert_id}/weights") in walked
    assert ("POST", "/v1/search") in walked


def test_public_reads_still_serve_anonymous_callers_and_valid_tokens(api) -> None:
    values = _path_values(api)
    for path in [
        "/healthz",
        "/v1/base-models/{revision}",
        "/v1/experts/{expert_id}/datasheet",
        "/v1/experts/{expert_id}/weights",
        "/v1/compositions/{composition_id}",
    ]:
        url = path.format(**values)
        assert api.client.get(url).status_code == 200, url
        assert api.client.get(url, headers=api.auth(api.tokens.bob)).status_code == 200, url


def test_a_refused_credential_changes_nothing(api) -> None:
    bad = {"Authorization": "Bearer agora_not-a-real-token"}
    before = api.leftovers()
    response = api.submit(headers=bad)
    assert response.status_code == 401
    assert api.leftovers() == before
    response = api.client.post(
        "/v1/search", json={"texts": ["x"], "base_revision": api.base.revision}, headers=bad
    )
    assert response.status_code == 401


def test_a_token_is_looked_up_once_per_request(api, monkeypatch) -> None:
    """The app-wide check and the route's own role check share one lookup."""
    import registry.api.deps as deps

    calls = []
    real = deps.authenticate

    def counting(**kwargs):
        calls.append(kwargs["secret"])
        return real(**kwargs)

    monkeypatch.setattr(deps, "authenticate", counting)
    expert = api.submit(api.tokens.alice)
    assert expert.status_code == 201
    assert len(calls) == 1
    for path, token in [
        ("/v1/jobs", api.tokens.moderator),
        ("/v1/experts?status=disabled", api.tokens.moderator),
        (f"/v1/experts/{expert.json()['id']}", api.tokens.bob),
        ("/healthz", api.tokens.bob),
    ]:
        calls.clear()
        assert api.client.get(path, headers=api.auth(token)).status_code == 200, path
        assert calls == [token], path
    calls.clear()
    assert api.client.get("/v1/experts").status_code == 200
    assert calls == []
