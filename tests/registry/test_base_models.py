"""Base model revisions through the HTTP API (SQLite + PostgreSQL)."""

from __future__ import annotations

import hashlib
import json

import pytest
from helpers.artifacts import base_revision, make_base_files, make_expert_schema


def _multipart(files: dict[str, bytes]) -> dict[str, tuple[str, bytes]]:
    return {
        "config": ("config.json", files["config.json"]),
        "tokenizer": ("tokenizer.json", files["tokenizer.json"]),
        "weights": ("model.safetensors", files["model.safetensors"]),
    }


def test_revision_is_the_manifest_digest_and_reposting_is_200(client, tokens) -> None:
    files = make_base_files(make_expert_schema(n_layers=3))
    auth = {"Authorization": f"Bearer {tokens.admin}"}
    created = client.post("/v1/base-models", files=_multipart(files), headers=auth)
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["revision"] == base_revision(files)
    assert body["files"]["weights"] == {
        "digest": "sha256:" + hashlib.sha256(files["model.safetensors"]).hexdigest(),
        "size": len(files["model.safetensors"]),
    }
    again = client.post("/v1/base-models", files=_multipart(files), headers=auth)
    assert again.status_code == 200
    assert again.json() == body
    listed = client.get("/v1/base-models").json()["items"]
    assert [item["revision"] for item in listed] == [body["revision"]]
    assert client.get(f"/v1/base-models/{body['revision']}").json() == body


@pytest.mark.parametrize(
    ("field", "name"),
    [("config", "config.json"), ("tokenizer", "tokenizer.json"), ("weights", "model.safetensors")],
)
def test_base_files_download_bit_exact(client, base, field, name) -> None:
    response = client.get(f"/v1/base-models/{base.revision}/files/{field}")
    assert response.status_code == 200
    assert response.content == base.files[name]
    digest = hashlib.sha256(base.files[name]).hexdigest()
    assert response.headers["x-agora-digest"] == f"sha256:{digest}"


def test_unknown_revision_and_file_are_404(client, base) -> None:
    missing = client.get(f"/v1/base-models/{'0' * 64}")
    assert missing.status_code == 404
    assert missing.json()["code"] == "base_model_not_found"
    bad_file = client.get(f"/v1/base-models/{base.revision}/files/optimizer")
    assert bad_file.status_code == 404
    assert bad_file.json()["code"] == "file_not_found"


def _broken(files: dict[str, bytes], case: str) -> dict[str, bytes]:
    files = dict(files)
    if case == "config_not_json":
        files["config.json"] = b"{not json"
    elif case == "config_without_schema":
        config = json.loads(files["config.json"])
        del config["expert_schema"]
        files["config.json"] = json.dumps(config).encode()
    elif case == "tokenizer_not_json":
        files["tokenizer.json"] = b"\x80\x81"
    elif case == "weights_pickle":
        files["model.safetensors"] = b"\x80\x04\x95" + b"\x00" * 32
    return files


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("config_not_json", "config_invalid"),
        ("config_without_schema", "expert_schema_invalid"),
        ("tokenizer_not_json", "tokenizer_invalid"),
        ("weights_pickle", "not_safetensors"),
    ],
)
def test_invalid_base_files_are_refused_and_leave_nothing(client, tokens, app, case, code) -> None:
    files = _broken(make_base_files(), case)
    response = client.post(
        "/v1/base-models",
        files=_multipart(files),
        headers={"Authorization": f"Bearer {tokens.admin}"},
    )
    assert response.status_code == 422, response.text
    assert response.json()["code"] == code
    assert client.get("/v1/base-models").json()["items"] == []
    runtime = app.state.runtime
    assert list(runtime.store.list_keys()) == []
    assert runtime.staging.files() == []


def test_missing_file_is_400(client, tokens) -> None:
    files = make_base_files()
    response = client.post(
        "/v1/base-models",
        files={"config": ("config.json", files["config.json"])},
        headers={"Authorization": f"Bearer {tokens.admin}"},
    )
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "missing_field"
    assert {e["loc"][-1] for e in body["errors"]} == {"tokenizer", "weights"}


def test_idempotency_key_on_base_upload(client, tokens) -> None:
    files = make_base_files()
    headers = {"Authorization": f"Bearer {tokens.admin}", "Idempotency-Key": "base-1"}
    first = client.post("/v1/base-models", files=_multipart(files), headers=headers)
    assert first.status_code == 201
    replay = client.post("/v1/base-models", files=_multipart(files), headers=headers)
    assert replay.status_code == 201  # the stored response, status included
    assert replay.json() == first.json()
    other = make_base_files(seed=1)
    reused = client.post("/v1/base-models", files=_multipart(other), headers=headers)
    assert reused.status_code == 409
    assert reused.json()["code"] == "idempotency_key_reused"
