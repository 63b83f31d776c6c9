"""Expert submission, versions, listing and downloads through the HTTP API (SQLite + PG)."""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from io import BytesIO

import numpy as np
import pytest
from helpers.artifacts import make_datasheet, raw_safetensors

from registry.validation import DEFAULT_MAX_HEADER_BYTES


def test_submit_then_download_bit_exact(api) -> None:
    weights = api.expert_bytes(seed=1)
    response = api.submit(weights=weights)
    assert response.status_code == 201, response.text
    body = response.json()
    digest = hashlib.sha256(weights).hexdigest()
    assert body["version"] == 1
    assert body["status"] == "active"
    assert body["digest"] == f"sha256:{digest}"
    assert body["id"].startswith("ex_")
    assert len(body["id"]) == 29

    download = api.client.get(f"/v1/experts/{body['id']}/weights")
    assert download.status_code == 200
    assert download.content == weights
    assert download.headers["x-agora-digest"] == f"sha256:{digest}"
    assert download.headers["etag"] == f'"{digest}"'
    assert download.headers["accept-ranges"] == "bytes"
    assert int(download.headers["content-length"]) == len(weights)


def test_expert_metadata_comes_from_the_datasheet(api) -> None:
    datasheet = make_datasheet(name="Legal contracts", domain="Commercial contract clauses")
    expert_id = api.submit(datasheet=datasheet).json()["id"]
    expert = api.client.get(f"/v1/experts/{expert_id}").json()
    assert expert["name"] == "Legal contracts"
    assert expert["domain"] == "Commercial contract clauses"
    assert expert["owner"] == "alice"
    assert expert["base_revision"] == api.base.revision
    assert expert["latest_version"] == 1
    assert [v["version"] for v in expert["versions"]] == [1]
    sheet = api.client.get(f"/v1/experts/{expert_id}/datasheet")
    assert sheet.status_code == 200
    assert sheet.headers["content-type"].startswith("text/markdown")
    assert sheet.content == datasheet


@pytest.mark.parametrize(
    ("range_header", "start", "stop"),
    [("bytes=10-19", 10, 20), ("bytes=100-", 100, None), ("bytes=-7", -7, None)],
)
def test_weights_range_requests(api, range_header, start, stop) -> None:
    weights = api.expert_bytes()
    expert_id = api.submit(weights=weights).json()["id"]
    response = api.client.get(f"/v1/experts/{expert_id}/weights", headers={"Range": range_header})
    assert response.status_code == 206
    expected = weights[start:stop]
    assert response.content == expected
    first = start if start >= 0 else len(weights) + start
    assert response.headers["content-range"] == (
        f"bytes {first}-{first + len(expected) - 1}/{len(weights)}"
    )


def test_unsatisfiable_range_is_416(api) -> None:
    weights = api.expert_bytes()
    expert_id = api.submit(weights=weights).json()["id"]
    response = api.client.get(
        f"/v1/experts/{expert_id}/weights", headers={"Range": f"bytes={len(weights)}-"}
    )
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{len(weights)}"
    assert response.json()["code"] == "range_not_satisfiable"


def test_new_version_keeps_old_versions_immutable(api) -> None:
    v1 = api.expert_bytes(seed=1)
    v2 = api.expert_bytes(seed=2)
    expert_id = api.submit(weights=v1).json()["id"]
    second = api.submit(weights=v2, expert_id=expert_id)
    assert second.status_code == 201, second.text
    assert second.json()["id"] == expert_id
    assert second.json()["version"] == 2

    get = api.client.get
    assert get(f"/v1/experts/{expert_id}/weights").content == v2
    assert get(f"/v1/experts/{expert_id}/weights?version=1").content == v1
    assert get(f"/v1/experts/{expert_id}/weights?version=2").content == v2
    versions = get(f"/v1/experts/{expert_id}/versions").json()["items"]
    assert [(v["version"], v["digest"]) for v in versions] == [
        (1, f"sha256:{hashlib.sha256(v1).hexdigest()}"),
        (2, f"sha256:{hashlib.sha256(v2).hexdigest()}"),
    ]
    assert get(f"/v1/experts/{expert_id}").json()["latest_version"] == 2
    missing = get(f"/v1/experts/{expert_id}/weights?version=3")
    assert missing.status_code == 404
    assert missing.json()["code"] == "version_not_found"


def test_identical_bytes_are_stored_once(api) -> None:
    before = api.leftovers()
    weights = api.expert_bytes(seed=5)
    first = api.submit(weights=weights).json()
    second = api.submit(weights=weights, datasheet=make_datasheet(name="Same bytes again"))
    assert second.status_code == 201
    assert second.json()["id"] != first["id"]
    assert second.json()["digest"] == first["digest"]
    after = api.leftovers()
    assert after.experts == before.experts + 2
    assert after.blob_rows == before.blob_rows + 1
    assert len(after.blob_files) == len(before.blob_files) + 1


def test_other_contributor_cannot_add_a_version(api) -> None:
    expert_id = api.submit(api.tokens.alice).json()["id"]
    before = api.leftovers()
    response = api.submit(api.tokens.bob, weights=api.expert_bytes(seed=9), expert_id=expert_id)
    assert response.status_code == 403
    assert response.json()["code"] == "not_owner"
    assert api.leftovers() == before
    # An admin may act on anyone's expert.
    admin = api.submit(api.tokens.admin, weights=api.expert_bytes(seed=9), expert_id=expert_id)
    assert admin.status_code == 201
    assert admin.json()["version"] == 2


def test_version_of_unknown_expert_is_404(api) -> None:
    response = api.submit(expert_id="ex_00000000000000000000000000")
    assert response.status_code == 404
    assert response.json()["code"] == "expert_not_found"


def _zip() -> bytes:
    buffer = BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("data.pkl", b"not really")
    return buffer.getvalue()


def _with_first_tensor(api, make) -> bytes:
    """An otherwise valid expert whose first tensor is ``make(shape)`` (None drops it)."""
    first = api.base.schema["tensors"][0]
    return api.expert_bytes(tensor_overrides={first["name"]: make(tuple(first["shape"]))})


def _poisoned(shape: tuple[int, ...], value: float) -> np.ndarray:
    values = np.zeros(shape, dtype=np.float32)
    values[-1, -1] = value
    return values


_ENTRY = json.dumps({"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}).encode()
_GAP = {
    "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
    "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
}

# case -> (build the weights from the api fixture, the code the endpoint must answer)
BAD_WEIGHTS = {
    "zip": (lambda api: _zip(), "not_safetensors"),
    "pickle": (lambda api: pickle.dumps({"w": [1.0, 2.0]}), "not_safetensors"),
    "truncated": (lambda api: api.expert_bytes()[:-16], "data_size_mismatch"),
    # A header over the cap, inside a file long enough to hold it.
    "header_too_large": (
        lambda api: raw_safetensors(b"{" + b" " * DEFAULT_MAX_HEADER_BYTES + b"}"),
        "header_too_large",
    ),
    "header_not_json": (lambda api: raw_safetensors(b"{not json}"), "header_invalid"),
    "header_not_braced": (lambda api: raw_safetensors(b"[1, 2, 3]"), "not_safetensors"),
    "duplicate_key": (
        lambda api: raw_safetensors(b'{"a":' + _ENTRY + b',"a":' + _ENTRY + b"}", b"\0" * 4),
        "duplicate_key",
    ),
    "offsets_gap": (lambda api: raw_safetensors(_GAP, b"\0" * 12), "tensor_offsets_invalid"),
    "metadata_not_string": (
        lambda api: api.expert_bytes(metadata_overrides={"n_modules": 1}),
        "metadata_not_string",
    ),
    "wrong_format": (
        lambda api: api.expert_bytes(metadata_overrides={"format": "agora.expert/0"}),
        "wrong_format",
    ),
    "revision_mismatch": (
        lambda api: api.expert_bytes(metadata_overrides={"base_revision": "0" * 64}),
        "base_revision_mismatch",
    ),
    "dtype_not_allowed": (lambda api: api.expert_bytes(dtype="float64"), "dtype_not_allowed"),
    "mixed_dtypes": (
        lambda api: _with_first_tensor(api, lambda shape: np.zeros(shape, np.float16)),
        "mixed_dtypes",
    ),
    "nan": (
        lambda api: _with_first_tensor(api, lambda shape: _poisoned(shape, np.nan)),
        "non_finite_values",
    ),
    "inf": (
        lambda api: _with_first_tensor(api, lambda shape: _poisoned(shape, -np.inf)),
        "non_finite_values",
    ),
    "wrong_shape": (
        lambda api: _with_first_tensor(
            api, lambda shape: np.zeros((shape[0] + 1, *shape[1:]), np.float32)
        ),
        "tensor_shape_mismatch",
    ),
    "missing_tensor": (
        lambda api: _with_first_tensor(api, lambda shape: None),
        "tensor_set_mismatch",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_WEIGHTS))
def test_invalid_weights_are_refused_and_leave_nothing(api, case) -> None:
    build, code = BAD_WEIGHTS[case]
    weights = build(api)
    before = api.leftovers()
    response = api.submit(weights=weights)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == code
    after = api.leftovers()
    assert after == before
    assert after.staging_files == []


@pytest.mark.parametrize(
    ("datasheet", "code"),
    [
        (b"# no front matter at all\n", "datasheet_front_matter"),
        (make_datasheet(license=None), "datasheet_invalid"),
        (make_datasheet(samples=["x" * (65 * 1024)]), "samples_too_large"),
    ],
)
def test_invalid_datasheet_is_refused_and_leaves_nothing(api, datasheet, code) -> None:
    before = api.leftovers()
    response = api.submit(datasheet=datasheet)
    assert response.status_code in (413, 422), response.text
    assert response.json()["code"] == code
    assert api.leftovers() == before


def test_unknown_base_revision_is_refused(api) -> None:
    # The same code as every other reference to a missing base (GET /v1/base-models/REV,
    # search, compose), with the command that lists the valid values.
    before = api.leftovers()
    response = api.submit(base_revision="f" * 64)
    assert response.status_code == 404
    assert response.json()["code"] == "base_model_not_found"
    assert "`agora base list`" in response.json()["detail"]
    assert api.leftovers() == before


def test_missing_datasheet_is_refused(api) -> None:
    response = api.client.post(
        "/v1/experts",
        files={"weights": ("e.safetensors", api.expert_bytes())},
        data={"base_revision": api.base.revision},
        headers=api.auth(api.tokens.alice),
    )
    assert response.status_code == 400
    assert response.json()["code"] == "missing_field"
    assert api.leftovers().staging_files == []


def test_oversized_upload_is_413_and_leaves_nothing(api) -> None:
    runtime = api.app.state.runtime
    weights = api.expert_bytes()
    runtime.settings = runtime.settings.model_copy(update={"max_expert_bytes": len(weights) - 1})
    before = api.leftovers()
    response = api.submit(weights=weights)
    assert response.status_code == 413
    assert response.json()["code"] == "file_too_large"
    assert api.leftovers() == before
    assert before.staging_files == []


def test_writes_need_multipart(api) -> None:
    response = api.client.post(
        "/v1/experts",
        json={"base_revision": api.base.revision},
        headers=api.auth(api.tokens.alice),
    )
    assert response.status_code == 415
    assert response.json()["code"] == "expected_multipart"


def test_unexpected_field_is_refused(api) -> None:
    response = api.client.post(
        "/v1/experts",
        files={
            "weights": ("e.safetensors", api.expert_bytes()),
            "datasheet": ("d.md", make_datasheet()),
            "extra": ("x.bin", b"x"),
        },
        data={"base_revision": api.base.revision},
        headers=api.auth(api.tokens.alice),
    )
    assert response.status_code == 400
    assert response.json()["code"] == "unexpected_field"
    assert api.leftovers().staging_files == []


def test_idempotency_key_replays_the_first_response(api) -> None:
    headers = {"Idempotency-Key": "submit-1"}
    weights = api.expert_bytes(seed=3)
    first = api.submit(weights=weights, headers=headers)
    assert first.status_code == 201
    replay = api.submit(weights=weights, headers=headers)
    assert replay.status_code == 201
    assert replay.json() == first.json()
    assert api.leftovers().experts == 1
    # The key belongs to alice's token: bob's identical key is a different request.
    bob = api.submit(api.tokens.bob, weights=weights, headers=headers)
    assert bob.status_code == 201
    assert bob.json()["id"] != first.json()["id"]


def test_idempotency_key_reused_for_other_content_is_409(api) -> None:
    headers = {"Idempotency-Key": "submit-2"}
    assert api.submit(weights=api.expert_bytes(seed=1), headers=headers).status_code == 201
    before = api.leftovers()
    response = api.submit(weights=api.expert_bytes(seed=2), headers=headers)
    assert response.status_code == 409
    assert response.json()["code"] == "idempotency_key_reused"
    assert api.leftovers().experts == before.experts


def _submit_many(api, count: int) -> list[str]:
    return [api.submit(weights=api.expert_bytes(seed=i)).json()["id"] for i in range(count)]


def test_list_paginates_with_an_opaque_cursor(api) -> None:
    ids = _submit_many(api, 5)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = api.client.get("/v1/experts", params=params).json()
        seen += [item["id"] for item in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == list(reversed(ids))  # newest first, each exactly once


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"limit": 0}, "invalid_request"),
        ({"limit": 101}, "invalid_request"),
        ({"cursor": "not-a-cursor"}, "invalid_cursor"),
        ({"status": "deleted"}, "invalid_status"),
    ],
)
def test_list_rejects_bad_parameters(api, params, code) -> None:
    if params.get("status"):
        response = api.client.get(
            "/v1/experts", params=params, headers=api.auth(api.tokens.moderator)
        )
    else:
        response = api.client.get("/v1/experts", params=params)
    assert response.status_code == 400
    assert response.json()["code"] == code


def test_list_filters_by_domain_text_and_base(api) -> None:
    legal = api.submit(
        weights=api.expert_bytes(seed=1),
        datasheet=make_datasheet(name="Contracts", domain="Commercial LAW and contracts"),
    ).json()["id"]
    api.submit(weights=api.expert_bytes(seed=2))
    found = api.client.get("/v1/experts", params={"q": "law"}).json()["items"]
    assert [item["id"] for item in found] == [legal]
    # LIKE wildcards in q are literal: "%" matches no domain.
    assert api.client.get("/v1/experts", params={"q": "%"}).json()["items"] == []
    by_base = api.client.get("/v1/experts", params={"base_revision": api.base.revision})
    assert len(by_base.json()["items"]) == 2
    other = api.client.get("/v1/experts", params={"base_revision": "0" * 64})
    assert other.json()["items"] == []


def test_listing_disabled_experts_needs_a_moderator(api) -> None:
    anonymous = api.client.get("/v1/experts", params={"status": "disabled"})
    assert anonymous.status_code == 401
    contributor = api.client.get(
        "/v1/experts", params={"status": "disabled"}, headers=api.auth(api.tokens.alice)
    )
    assert contributor.status_code == 403
    moderator = api.client.get(
        "/v1/experts", params={"status": "disabled"}, headers=api.auth(api.tokens.moderator)
    )
    assert moderator.status_code == 200


def test_disabled_expert_downloads_are_451(api) -> None:
    from registry.db.models import Expert

    expert_id = api.submit().json()["id"]
    with api.app.state.runtime.sessions() as session, session.begin():
        session.get(Expert, expert_id).status = "disabled"
    for path in ("weights", "datasheet"):
        response = api.client.get(f"/v1/experts/{expert_id}/{path}")
        assert response.status_code == 451
        assert response.json()["code"] == "expert_disabled"
    assert api.client.get("/v1/experts").json()["items"] == []


def test_unknown_expert_is_404_problem(api) -> None:
    response = api.client.get("/v1/experts/ex_nope")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == "expert_not_found"


def test_concurrent_versions_get_distinct_dense_numbers(api) -> None:
    from concurrent.futures import ThreadPoolExecutor

    expert_id = api.submit(weights=api.expert_bytes(seed=100)).json()["id"]
    payloads = [api.expert_bytes(seed=101 + i) for i in range(6)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        responses = list(pool.map(lambda w: api.submit(weights=w, expert_id=expert_id), payloads))
    assert [r.status_code for r in responses] == [201] * 6
    assert sorted(r.json()["version"] for r in responses) == [2, 3, 4, 5, 6, 7]
    versions = api.client.get(f"/v1/experts/{expert_id}/versions").json()["items"]
    by_version = {v["version"]: v["digest"] for v in versions}
    for response, weights in zip(responses, payloads, strict=True):
        assert by_version[response.json()["version"]] == response.json()["digest"]
        download = api.client.get(
            f"/v1/experts/{expert_id}/weights", params={"version": response.json()["version"]}
        )
        assert download.content == weights


def test_head_gives_size_and_digest_without_a_body(api) -> None:
    weights = api.expert_bytes()
    expert_id = api.submit(weights=weights).json()["id"]
    head = api.client.head(f"/v1/experts/{expert_id}/weights")
    assert head.status_code == 200
    assert head.content == b""
    assert int(head.headers["content-length"]) == len(weights)
    assert head.headers["x-agora-digest"] == f"sha256:{hashlib.sha256(weights).hexdigest()}"
    ranged = api.client.head(f"/v1/experts/{expert_id}/weights", headers={"Range": "bytes=4-"})
    assert ranged.status_code == 206
    assert ranged.headers["content-range"] == f"bytes 4-{len(weights) - 1}/{len(weights)}"


def test_malformed_multipart_is_400_and_leaves_nothing(api) -> None:
    headers = {
        **api.auth(api.tokens.alice),
        "Content-Type": "multipart/form-data; boundary=XYZ",
    }
    body = (
        b'--XYZ\r\nContent-Disposition: form-data; name="weights"; filename="w"\r\n\r\n'
        + api.expert_bytes()
    )  # the body stops before its closing boundary
    response = api.client.post("/v1/experts", content=body, headers=headers)
    assert response.status_code == 400
    assert response.json()["code"] == "bad_multipart"
    assert api.leftovers().staging_files == []


def test_gc_forgets_old_idempotency_keys(api, database_url, tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from agora.cli import build_app

    headers = {"Idempotency-Key": "old-key"}
    first = api.submit(weights=api.expert_bytes(seed=1), headers=headers)
    assert first.status_code == 201
    monkeypatch.setenv("AGORA_DATABASE_URL", database_url)
    monkeypatch.setenv("AGORA_DATA_DIR", str(tmp_path / "cli"))
    monkeypatch.setenv("AGORA_IDEMPOTENCY_TTL_SECONDS", "0")
    result = CliRunner().invoke(build_app(), ["admin", "gc"])
    assert result.exit_code == 0, result.output
    assert "expired idempotency keys removed: 1" in result.output
    # The key is free again: other content under it is a new request, not a 409.
    again = api.submit(weights=api.expert_bytes(seed=2), headers=headers)
    assert again.status_code == 201
    assert again.json()["id"] != first.json()["id"]


def test_upload_written_in_many_batches_is_bit_exact(api, monkeypatch) -> None:
    # Small batches: the worker thread writes the file in ~20 pieces, in order.
    monkeypatch.setattr("registry.api.uploads.FLUSH_BYTES", 512)
    weights = api.expert_bytes(seed=42)
    body = api.submit(weights=weights).json()
    assert body["digest"] == f"sha256:{hashlib.sha256(weights).hexdigest()}"
    assert api.client.get(f"/v1/experts/{body['id']}/weights").content == weights


def test_failure_after_the_blob_leaves_an_orphan_not_a_dangling_row(api, monkeypatch) -> None:
    """Blob committed, then the row's transaction fails: no row names the blob, and the
    garbage collector removes the orphan once its grace period has passed."""
    import datetime as dt

    from fastapi.testclient import TestClient

    from registry.services import experts as service
    from registry.services.gc import collect_garbage

    def database_fails(**kwargs):
        raise RuntimeError("the database went away mid-commit")

    monkeypatch.setattr(service, "record_version", database_fails)
    # Answer the 500 as a client would see it, instead of re-raising into the test.
    api.client = TestClient(api.app, raise_server_exceptions=False)
    before = api.leftovers()
    response = api.submit(weights=api.expert_bytes(seed=77))
    assert response.status_code == 500
    assert response.json()["code"] == "internal_error"
    after = api.leftovers()
    assert (after.experts, after.versions, after.blob_rows) == (
        before.experts,
        before.versions,
        before.blob_rows,
    )
    assert len(after.blob_files) == len(before.blob_files) + 1  # the orphan
    assert after.staging_files == []

    runtime = api.app.state.runtime
    with runtime.sessions() as session:
        report = collect_garbage(
            session=session,
            store=runtime.store,
            staging=runtime.staging,
            grace=dt.timedelta(seconds=60),
            now=dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5),
        )
    assert report.objects_deleted == 1
    assert api.leftovers().blob_files == before.blob_files  # the base model's blobs stay


def test_the_owner_resubmitting_the_same_expert_gets_the_stored_version_back(api) -> None:
    """The README's quickstart run twice: the same owner, weights and datasheet answer 200
    with the expert already stored, so search does not split its weight between copies."""
    weights = api.expert_bytes(seed=5)
    datasheet = make_datasheet(name="Tide pools", domain="intertidal ecology field notes")
    first = api.submit(weights=weights, datasheet=datasheet)
    assert first.status_code == 201, first.text
    before = api.leftovers()

    again = api.submit(weights=weights, datasheet=datasheet)
    assert again.status_code == 200, again.text
    assert again.json() == first.json()
    assert api.leftovers() == before  # no row, no blob, no staging file left behind
    listed = api.client.get("/v1/experts").json()["items"]
    assert [e["id"] for e in listed] == [first.json()["id"]]
    hits = api.client.post(
        "/v1/search",
        json={"texts": ["intertidal ecology field notes"], "base_revision": api.base.revision},
    ).json()["results"]
    assert [(h["expert_id"], h["weight"]) for h in hits] == [(first.json()["id"], 1.0)]


def test_a_resubmission_with_an_idempotency_key_stores_the_200(api) -> None:
    weights = api.expert_bytes(seed=6)
    first = api.submit(weights=weights)
    headers = {"Idempotency-Key": "quickstart-twice"}
    again = api.submit(weights=weights, headers=headers)
    replay = api.submit(weights=weights, headers=headers)
    assert (again.status_code, replay.status_code) == (200, 200)
    assert again.json() == replay.json() == first.json()


@pytest.mark.parametrize("change", ["owner", "weights", "datasheet"])
def test_another_owner_or_other_content_is_a_new_expert(api, change) -> None:
    weights = api.expert_bytes(seed=7)
    datasheet = make_datasheet(name="Tide pools")
    first = api.submit(weights=weights, datasheet=datasheet)
    assert first.status_code == 201, first.text
    second = api.submit(
        api.tokens.bob if change == "owner" else None,
        weights=api.expert_bytes(seed=8) if change == "weights" else weights,
        datasheet=make_datasheet(name="Rock pools") if change == "datasheet" else datasheet,
    )
    assert second.status_code == 201, second.text
    assert second.json()["id"] != first.json()["id"]
    assert api.leftovers().staging_files == []


def test_a_new_version_with_the_same_bytes_is_still_a_new_version(api) -> None:
    # The repeat rule is about new experts: naming expert_id asks for a version.
    weights = api.expert_bytes(seed=9)
    first = api.submit(weights=weights).json()
    again = api.submit(weights=weights, expert_id=first["id"])
    assert again.status_code == 201, again.text
    assert (again.json()["id"], again.json()["version"]) == (first["id"], 2)


def test_a_missing_reference_has_one_code_wherever_it_appears(api) -> None:
    """A base revision or an expert that does not exist: the same 404 code in the URL and
    in a request body, with the command that lists the valid values."""
    token = api.auth(api.tokens.alice)
    missing_base = "0" * 64
    refusals = [
        api.client.get(f"/v1/base-models/{missing_base}"),
        api.submit(base_revision=missing_base),
        api.client.post("/v1/search", json={"texts": ["x"], "base_revision": missing_base}),
        api.client.post(
            "/v1/compositions",
            json={"method": "mixture", "base_revision": missing_base, "experts": ["ex_x"]},
            headers=token,
        ),
    ]
    for response in refusals:
        assert (response.status_code, response.json()["code"]) == (404, "base_model_not_found")
        assert "`agora base list`" in response.json()["detail"]

    refusals = [
        api.client.get("/v1/experts/ex_nothere"),
        api.submit(expert_id="ex_nothere"),
        api.client.post(
            "/v1/compositions",
            json={
                "method": "mixture",
                "base_revision": api.base.revision,
                "experts": ["ex_nothere"],
            },
            headers=token,
        ),
        api.client.post(
            "/v1/evaluations",
            json={"expert_id": "ex_nothere", "text_sets": {"a": ["some text"]}},
            headers=token,
        ),
    ]
    for response in refusals:
        assert (response.status_code, response.json()["code"]) == (404, "expert_not_found")
        assert "`agora expert list`" in response.json()["detail"]

    expert = api.submit(weights=api.expert_bytes(seed=10)).json()["id"]
    refusals = [
        api.client.get(f"/v1/experts/{expert}/datasheet?version=3"),
        api.client.post(
            "/v1/evaluations",
            json={"expert_id": expert, "version": 3, "text_sets": {"a": ["some text"]}},
            headers=token,
        ),
    ]
    for response in refusals:
        assert (response.status_code, response.json()["code"]) == (404, "version_not_found")
        assert "its versions are 1 to 1" in response.json()["detail"]


# -- experts of some layers only (docs/composition.md, "Experts in some layers only") ------


def _layer_tensors(api, layer: int) -> list[str]:
    return sorted(
        t["name"] for t in api.base.schema["tensors"] if t["name"].startswith(f"layers.{layer}.")
    )


def test_an_expert_of_some_layers_is_accepted_and_shows_its_layers(api) -> None:
    # The test base has MoE layers 0 and 1; this expert covers layer 1 only.
    full = api.expert_bytes(seed=3)
    subset = api.expert_bytes(
        seed=3,
        metadata_overrides={"layers": "[1]"},
        tensor_overrides=dict.fromkeys(_layer_tensors(api, 0)),
    )
    assert len(subset) < len(full)
    response = api.submit(weights=subset)
    assert response.status_code == 201, response.text
    expert_id = response.json()["id"]
    versions = api.client.get(f"/v1/experts/{expert_id}/versions").json()["items"]
    assert [v["layers"] for v in versions] == [[1]]
    detail = api.client.get(f"/v1/experts/{expert_id}").json()
    assert detail["versions"][0]["layers"] == [1]
    assert api.client.get(f"/v1/experts/{expert_id}/weights").content == subset


def test_an_expert_whose_tensors_are_not_its_declared_layers_is_refused(api) -> None:
    before = api.leftovers()
    # Declares layer 1 but holds layer 0's tensors too: they are named as unexpected.
    response = api.submit(weights=api.expert_bytes(metadata_overrides={"layers": "[1]"}))
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["code"] == "tensor_set_mismatch"
    assert sorted(e["tensor"] for e in body["errors"]) == _layer_tensors(api, 0)
    assert {e["problem"] for e in body["errors"]} == {"unexpected"}
    # Declares layers 0 and 1 but holds layer 1 only: layer 0's are named as missing.
    response = api.submit(
        weights=api.expert_bytes(tensor_overrides=dict.fromkeys(_layer_tensors(api, 0)))
    )
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["code"] == "tensor_set_mismatch"
    assert sorted(e["tensor"] for e in body["errors"]) == _layer_tensors(api, 0)
    assert {e["problem"] for e in body["errors"]} == {"missing"}
    assert api.leftovers() == before


def test_an_expert_of_a_layer_the_base_lacks_is_refused(api) -> None:
    before = api.leftovers()
    # Layer 1's tensors renamed to layer 7 (the base has 0 and 1), metadata to match.
    renamed = {n.replace("layers.1.", "layers.7.", 1): None for n in _layer_tensors(api, 1)}
    shapes = {t["name"]: t["shape"] for t in api.base.schema["tensors"]}
    tensors = {
        **dict.fromkeys(_layer_tensors(api, 1)),
        **{
            new: np.zeros(shapes[new.replace("layers.7.", "layers.1.", 1)], np.float32)
            for new in renamed
        },
    }
    response = api.submit(
        weights=api.expert_bytes(metadata_overrides={"layers": "[0,7]"}, tensor_overrides=tensors)
    )
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["code"] == "metadata_invalid"
    assert body["errors"][0]["key"] == "layers"
    assert "layer 7 is not a layer of the base" in body["errors"][0]["message"]
    assert api.leftovers() == before
