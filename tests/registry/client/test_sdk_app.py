"""The SDK against the real registry app in-process: round trips, resume, cache, errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest
from helpers.artifacts import (
    base_revision,
    make_base_files,
    make_datasheet,
    make_expert_schema,
    write_expert,
)

from registry.client import (
    Agora,
    Conflict,
    Forbidden,
    NotFound,
    Unauthenticated,
    ValidationFailed,
)


def write_valid_expert(tmp_path: Path, base, *, seed: int = 0, name: str = "e") -> Path:
    return write_expert(
        tmp_path / f"{name}.safetensors", base.schema, base_revision=base.revision, seed=seed
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_submit_list_get_download_round_trip(alice: Agora, base, wire, tmp_path: Path) -> None:
    weights = write_valid_expert(tmp_path, base)
    datasheet = make_datasheet(name="Tide pools", domain="Intertidal ecology field notes")
    sheet_path = tmp_path / "DATASHEET.md"
    sheet_path.write_bytes(datasheet)

    submitted = alice.submit_expert(weights, sheet_path, base.revision)
    assert submitted.version == 1
    assert submitted.status == "active"
    assert submitted.digest == f"sha256:{sha256(weights)}"
    (post,) = [e for e in wire.exchanges if e.method == "POST"]
    assert post.idempotency_key is not None

    listed = list(alice.list_experts(base_revision=base.revision))
    assert [e.id for e in listed] == [submitted.id]
    assert [e.id for e in alice.list_experts(q="intertidal")] == [submitted.id]

    expert = alice.get_expert(submitted.id)
    assert (expert.name, expert.owner, expert.latest_version) == ("Tide pools", "alice", 1)
    assert expert.versions[0].digest == submitted.digest
    assert expert.versions[0].size == weights.stat().st_size
    assert alice.get_datasheet(submitted.id).encode() == datasheet

    out = alice.download(submitted.id, dest=tmp_path / "out")
    assert out.read_bytes() == weights.read_bytes()
    # The cached copy is keyed by digest.
    assert alice.cache.blob_path(sha256(weights)).read_bytes() == weights.read_bytes()


def test_new_version_with_expert_id_and_datasheet_as_text(
    alice: Agora, base, tmp_path: Path
) -> None:
    first = alice.submit_expert(
        write_valid_expert(tmp_path, base, seed=1, name="v1"),
        make_datasheet().decode(),
        base.revision,
    )
    v2_path = write_valid_expert(tmp_path, base, seed=2, name="v2")
    second = alice.submit_expert(
        v2_path, make_datasheet().decode(), base.revision, expert_id=first.id
    )
    assert (second.id, second.version) == (first.id, 2)
    assert alice.download(first.id).read_bytes() == v2_path.read_bytes()
    assert sha256(alice.download(first.id, version=1)) == first.digest.removeprefix("sha256:")


def test_second_download_transfers_nothing(alice: Agora, base, wire, tmp_path: Path) -> None:
    weights = write_valid_expert(tmp_path, base)
    expert_id = alice.submit_expert(weights, make_datasheet().decode(), base.revision).id
    first = alice.download(expert_id)
    assert len(wire.weights()) == 1
    second = alice.download(expert_id, dest=tmp_path / "again.safetensors")
    # Served from the cache, once the registry confirmed it still serves the expert: a
    # one-byte ranged request (docs/governance.md, "Downloads and the local cache").
    revalidation = wire.weights()[1:]
    assert [(e.status, e.range, e.body_bytes) for e in revalidation] == [(206, "bytes=0-0", 1)]
    assert second.read_bytes() == first.read_bytes() == weights.read_bytes()


def test_download_resumes_from_a_partial_file(alice: Agora, base, wire, tmp_path: Path) -> None:
    weights = write_valid_expert(tmp_path, base)
    data = weights.read_bytes()
    expert_id = alice.submit_expert(weights, make_datasheet().decode(), base.revision).id
    kept = len(data) // 3
    part = alice.cache.part_path(sha256(weights))
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(data[:kept])  # as an interrupted download would have left it

    path = alice.download(expert_id)

    assert path.read_bytes() == data
    (transfer,) = wire.weights()
    assert transfer.range == f"bytes={kept}-"
    assert transfer.status == 206
    assert transfer.body_bytes == len(data) - kept
    assert not part.exists()


def test_corrupted_partial_file_is_detected_and_fetched_again(
    alice: Agora, base, wire, tmp_path: Path
) -> None:
    weights = write_valid_expert(tmp_path, base)
    data = weights.read_bytes()
    expert_id = alice.submit_expert(weights, make_datasheet().decode(), base.revision).id
    part = alice.cache.part_path(sha256(weights))
    part.parent.mkdir(parents=True, exist_ok=True)
    corrupted = bytearray(data[:100])
    corrupted[50] ^= 0xFF
    part.write_bytes(bytes(corrupted))

    path = alice.download(expert_id)

    assert path.read_bytes() == data
    transfers = wire.weights()
    assert [t.range for t in transfers] == ["bytes=100-", None]
    assert transfers[1].body_bytes == len(data)


def test_corrupted_cache_entry_is_fetched_again(alice: Agora, base, wire, tmp_path: Path) -> None:
    weights = write_valid_expert(tmp_path, base)
    expert_id = alice.submit_expert(weights, make_datasheet().decode(), base.revision).id
    cached = alice.download(expert_id)
    with cached.open("r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")

    again = alice.download(expert_id)

    assert again.read_bytes() == weights.read_bytes()
    assert len(wire.weights()) == 2


def test_typed_errors_carry_the_servers_code(make_agora, tokens, base, tmp_path: Path) -> None:
    anonymous = make_agora(None)
    alice = make_agora(tokens.alice)
    bob = make_agora(tokens.bob)
    weights = write_valid_expert(tmp_path, base)
    sheet = make_datasheet().decode()

    with pytest.raises(Unauthenticated) as unauth:
        anonymous.submit_expert(weights, sheet, base.revision)
    assert unauth.value.status == 401

    with pytest.raises(NotFound) as missing:
        alice.get_expert("ex_00000000000000000000000000")
    assert missing.value.code == "expert_not_found"

    bad = write_expert(
        tmp_path / "bad.safetensors",
        make_expert_schema(d_model=8),  # shapes that do not fit the base
        base_revision=base.revision,
    )
    with pytest.raises(ValidationFailed) as invalid:
        alice.submit_expert(bad, sheet, base.revision)
    assert invalid.value.status == 422
    assert invalid.value.code == "tensor_shape_mismatch"
    assert invalid.value.errors[0]["tensor"] == "layers.0.moe.module.w_in"
    assert invalid.value.problem["code"] == invalid.value.code

    owned = alice.submit_expert(weights, sheet, base.revision)
    with pytest.raises(Forbidden) as forbidden:
        bob.submit_expert(weights, sheet, base.revision, expert_id=owned.id)
    assert forbidden.value.status == 403
    assert forbidden.value.code == "not_owner"

    with pytest.raises(Forbidden):
        alice.upload_base_model(*_base_paths(tmp_path, make_base_files(seed=5)))


def test_same_idempotency_key_is_applied_once(alice: Agora, base, tmp_path: Path) -> None:
    weights = write_valid_expert(tmp_path, base)
    sheet = make_datasheet().decode()
    first = alice.submit_expert(weights, sheet, base.revision, idempotency_key="k-1")
    replay = alice.submit_expert(weights, sheet, base.revision, idempotency_key="k-1")
    assert replay == first
    assert [e.id for e in alice.list_experts()] == [first.id]

    other = write_valid_expert(tmp_path, base, seed=9, name="other")
    with pytest.raises(Conflict) as reused:
        alice.submit_expert(other, sheet, base.revision, idempotency_key="k-1")
    assert reused.value.code == "idempotency_key_reused"


class _LoseFirstResponse(httpx.BaseTransport):
    """Forwards every request, but drops the response of the first POST (as a network would)."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner
        self.posts = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.method == "POST":
            self.posts += 1
            if self.posts == 1:
                response.close()
                raise httpx.ReadTimeout("response lost", request=request)
        return response


def test_retry_after_a_lost_response_submits_once(
    transport, wire, tokens, base, tmp_path: Path
) -> None:
    lossy = _LoseFirstResponse(transport)
    with Agora(
        "http://testserver", token=tokens.alice, transport=lossy, cache_dir=tmp_path / "c"
    ) as agora:
        agora._sleep = lambda _s: None
        weights = write_valid_expert(tmp_path, base)
        submitted = agora.submit_expert(weights, make_datasheet().decode(), base.revision)
        assert lossy.posts == 2
        keys = [e.idempotency_key for e in wire.exchanges if e.method == "POST"]
        assert len(keys) == 2
        assert keys[0] == keys[1]
        # The server applied the first attempt and replayed it for the retry: one expert.
        experts = list(agora.list_experts())
        assert [e.id for e in experts] == [submitted.id]
        assert experts[0].latest_version == 1


def _base_paths(tmp_path: Path, files: dict[str, bytes]) -> tuple[Path, Path, Path]:
    directory = tmp_path / f"base-{base_revision(files)[:8]}"
    directory.mkdir(exist_ok=True)
    paths = []
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (directory / name).write_bytes(files[name])
        paths.append(directory / name)
    return paths[0], paths[1], paths[2]


def test_base_model_upload_and_download(make_agora, tokens, tmp_path: Path) -> None:
    admin = make_agora(tokens.admin)
    files = make_base_files(seed=3)
    config, tokenizer, weights = _base_paths(tmp_path, files)

    created = admin.upload_base_model(config, tokenizer, weights, name="bench-base")
    assert created.revision == base_revision(files)
    assert (
        created.files.weights.digest
        == f"sha256:{hashlib.sha256(files['model.safetensors']).hexdigest()}"
    )
    # Identical files: the same revision, not a second one.
    assert admin.upload_base_model(config, tokenizer, weights).revision == created.revision
    assert created.revision in [b.revision for b in admin.list_base_models()]
    assert admin.get_base_model(created.revision) == created

    anonymous = make_agora(None, cache_dir=tmp_path / "other-cache")
    out = anonymous.download_base_model(created.revision, tmp_path / "fetched")
    for name, content in files.items():
        assert (out / name).read_bytes() == content
