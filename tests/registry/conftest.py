"""Fixtures for the registry service tests: an app on each database backend, tokens,
a stored base model, and a view of what the service left on disk and in the database."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from helpers.artifacts import make_base_files, make_datasheet, make_expert_bytes
from sqlalchemy import func, select

from registry.app import create_app
from registry.db.models import Blob, Expert, ExpertVersion
from registry.settings import Settings


@dataclass(frozen=True)
class Tokens:
    admin: str
    alice: str  # contributor
    bob: str  # contributor
    moderator: str
    worker: str


@dataclass(frozen=True)
class StoredBase:
    revision: str
    schema: dict[str, Any]
    files: dict[str, bytes]


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def base_multipart(files: dict[str, bytes]) -> dict[str, tuple[str, bytes]]:
    return {
        "config": ("config.json", files["config.json"]),
        "tokenizer": ("tokenizer.json", files["tokenizer.json"]),
        "weights": ("model.safetensors", files["model.safetensors"]),
    }


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "agora", database_url=database_url)


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    return create_app(settings)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def tokens(app: FastAPI, client: TestClient) -> Tokens:
    from registry.services.tokens import create_token

    runtime = app.state.runtime
    secrets: dict[str, str] = {}
    with runtime.sessions() as session, session.begin():
        for name, role in [
            ("admin", "admin"),
            ("alice", "contributor"),
            ("bob", "contributor"),
            ("moderator", "moderator"),
            ("worker", "worker"),
        ]:
            # The operator's own worker: trusted, its outputs go active unchecked
            # (tests/adversarial/test_lying_workers.py runs untrusted ones).
            _, secrets[name] = create_token(
                session=session, name=name, role=role, trusted=role == "worker"
            )
    return Tokens(**secrets)


@pytest.fixture
def base(client: TestClient, tokens: Tokens) -> StoredBase:
    files = make_base_files()
    response = client.post(
        "/v1/base-models", files=base_multipart(files), headers=auth(tokens.admin)
    )
    assert response.status_code == 201, response.text
    body = response.json()
    return StoredBase(revision=body["revision"], schema=body["expert_schema"], files=files)


class Api:
    """Calls tests make again and again, bound to one app, its client and its tokens."""

    def __init__(self, app: FastAPI, client: TestClient, tokens: Tokens, base: StoredBase):
        self.app = app
        self.client = client
        self.tokens = tokens
        self.base = base

    auth = staticmethod(auth)

    def expert_bytes(self, *, seed: int = 0, **overrides: Any) -> bytes:
        return make_expert_bytes(
            self.base.schema, base_revision=self.base.revision, seed=seed, **overrides
        )

    def submit(
        self,
        token: str | None = None,
        *,
        weights: bytes | None = None,
        datasheet: bytes | None = None,
        base_revision: str | None = None,
        expert_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        data = {"base_revision": self.base.revision if base_revision is None else base_revision}
        if expert_id is not None:
            data["expert_id"] = expert_id
        return self.client.post(
            "/v1/experts",
            files={
                "weights": (
                    "expert.safetensors",
                    self.expert_bytes() if weights is None else weights,
                ),
                "datasheet": ("DATASHEET.md", make_datasheet() if datasheet is None else datasheet),
            },
            data=data,
            headers={**auth(self.tokens.alice if token is None else token), **(headers or {})},
        )

    def leftovers(self) -> Leftovers:
        """Rows, committed blob files and staging files the service holds right now."""
        runtime = self.app.state.runtime
        with runtime.sessions() as session:
            experts = session.scalar(select(func.count()).select_from(Expert)) or 0
            versions = session.scalar(select(func.count()).select_from(ExpertVersion)) or 0
            blobs = session.scalar(select(func.count()).select_from(Blob)) or 0
        root = Path(runtime.store.location)
        blob_files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        staging = sorted(p for p in runtime.staging.directory.glob("*") if p.is_file())
        return Leftovers(experts, versions, blobs, blob_files, staging)


@dataclass(frozen=True)
class Leftovers:
    experts: int
    versions: int
    blob_rows: int
    blob_files: list[Path]
    staging_files: list[Path]


@pytest.fixture
def api(app: FastAPI, client: TestClient, tokens: Tokens, base: StoredBase) -> Api:
    return Api(app, client, tokens, base)
