"""The service end to end on the S3 backend (moto's server on loopback), on each database."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from helpers.artifacts import make_base_files

from registry.settings import Settings
from registry.storage import blob_key
from registry.storage.s3 import S3BlobStore


@pytest.fixture
def settings(database_url: str, tmp_path: Path, s3_server: str, s3_storage_url: str) -> Settings:
    # Overrides the local-directory settings of tests/registry/conftest.py.
    return Settings(
        data_dir=tmp_path / "agora",
        database_url=database_url,
        storage_url=s3_storage_url + "/registry",
        s3_endpoint_url=s3_server,
    )


def base_multipart(files: dict[str, bytes]) -> dict[str, tuple[str, bytes]]:
    return {
        "config": ("config.json", files["config.json"]),
        "tokenizer": ("tokenizer.json", files["tokenizer.json"]),
        "weights": ("model.safetensors", files["model.safetensors"]),
    }


def _objects(app: FastAPI) -> set[str]:
    store = app.state.runtime.store
    assert isinstance(store, S3BlobStore)
    return {key for key, _ in store.list_keys()}


def _staging(app: FastAPI) -> list[Path]:
    return list(app.state.runtime.staging.files())


def test_expert_round_trip_through_s3(api: Any) -> None:
    weights = api.expert_bytes(seed=3)
    response = api.submit(weights=weights)
    assert response.status_code == 201, response.text
    expert = response.json()
    digest = hashlib.sha256(weights).hexdigest()
    assert expert["digest"] == f"sha256:{digest}"
    assert blob_key(digest) in _objects(api.app)
    assert _staging(api.app) == []

    full = api.client.get(f"/v1/experts/{expert['id']}/weights")
    assert full.status_code == 200
    assert full.content == weights
    assert full.headers["x-agora-digest"] == f"sha256:{digest}"

    part = api.client.get(f"/v1/experts/{expert['id']}/weights", headers={"Range": "bytes=8-99"})
    assert part.status_code == 206
    assert part.content == weights[8:100]
    assert part.headers["content-range"] == f"bytes 8-99/{len(weights)}"


def test_base_model_files_come_back_from_s3(api: Any) -> None:
    for name, field in [
        ("config.json", "config"),
        ("tokenizer.json", "tokenizer"),
        ("model.safetensors", "weights"),
    ]:
        got = api.client.get(f"/v1/base-models/{api.base.revision}/files/{field}")
        assert got.status_code == 200
        assert got.content == api.base.files[name]
    # Re-posting identical files stores nothing new.
    before = _objects(api.app)
    again = api.client.post(
        "/v1/base-models",
        files=base_multipart(api.base.files),
        headers=api.auth(api.tokens.admin),
    )
    assert again.status_code == 200
    assert _objects(api.app) == before


def test_rejected_expert_leaves_nothing_in_the_bucket(api: Any) -> None:
    before = _objects(api.app)
    name = api.base.schema["tensors"][0]["name"]
    shape = api.base.schema["tensors"][0]["shape"]
    poisoned = np.full(shape, np.nan, dtype=np.float32)
    response = api.submit(weights=api.expert_bytes(tensor_overrides={name: poisoned}))
    assert response.status_code == 422
    assert response.json()["code"] == "non_finite_values"
    assert _objects(api.app) == before
    assert _staging(api.app) == []
    assert api.client.get("/v1/experts").json()["items"] == []


def test_readiness_follows_the_bucket(api: Any) -> None:
    assert api.client.get("/readyz").json()["checks"]["storage"] == "ok"
    store = api.app.state.runtime.store
    assert isinstance(store, S3BlobStore)
    # Empty and remove the bucket: storage is now unreachable for the service.
    for key in _objects(api.app):
        store.delete(key)
    store.client.delete_bucket(Bucket=store.bucket)
    try:
        response = api.client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["checks"] == {"database": "ok", "storage": "failed"}
    finally:
        store.client.create_bucket(Bucket=store.bucket)


def test_an_uploaded_base_is_usable_for_a_second_revision(api: Any) -> None:
    # A different base (another seed) on the same bucket: blobs are keyed by content only.
    files = make_base_files(seed=7)
    response = api.client.post(
        "/v1/base-models", files=base_multipart(files), headers=api.auth(api.tokens.admin)
    )
    assert response.status_code == 201, response.text
    digests = {f["digest"] for f in response.json()["files"].values()}
    keys = _objects(api.app)
    for digest in digests:
        assert blob_key(digest.removeprefix("sha256:")) in keys
