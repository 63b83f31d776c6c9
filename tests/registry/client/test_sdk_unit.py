"""SDK behaviour that needs no server: surface, error mapping, retries, resumable downloads.

A scripted ``httpx.MockTransport`` plays the registry, so each test controls exactly which
attempt fails and how.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

import registry.client as sdk
from registry.client import (
    Agora,
    AgoraError,
    BadRequest,
    Conflict,
    DigestMismatch,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    RangeNotSatisfiable,
    RateLimited,
    ServerError,
    ServiceUnavailable,
    TransportError,
    Unauthenticated,
    UnavailableForLegalReasons,
    UnsupportedMediaType,
    ValidationFailed,
)

Handler = Callable[[httpx.Request], httpx.Response]


def problem(status: int, code: str, detail: str = "nope", **extra: object) -> httpx.Response:
    body = {"type": "about:blank", "title": "x", "status": status, "detail": detail, "code": code}
    body.update(extra)
    return httpx.Response(
        status,
        content=json.dumps(body).encode(),
        headers={"Content-Type": "application/problem+json"},
    )


def make_client(handler: Handler, tmp_path: Path, **kwargs: object) -> tuple[Agora, list[float]]:
    agora = Agora(
        "http://registry.test",
        token="agora_test",
        transport=httpx.MockTransport(handler),
        cache_dir=tmp_path / "cache",
        **kwargs,  # type: ignore[arg-type]
    )
    sleeps: list[float] = []
    agora._sleep = sleeps.append
    return agora, sleeps


SUBMITTED = {"id": "ex_01", "version": 1, "digest": "sha256:" + "0" * 64, "status": "active"}


# --------------------------------------------------------------------------- surface


def test_public_surface_is_all_and_importable() -> None:
    expected = {
        "Agora",
        "AgoraError",
        "BadRequest",
        "BaseModelFiles",
        "BaseModelRevision",
        "Caution",
        "Composition",
        "CompositionWarning",
        "Conflict",
        "DigestMismatch",
        "DownloadIntegrityError",
        "DownloadInterrupted",
        "Evaluation",
        "EvaluationScore",
        "Expert",
        "ExpertPage",
        "ExpertRef",
        "ExpertVersion",
        "FileInfo",
        "Forbidden",
        "Job",
        "JobAccepted",
        "JobCancelled",
        "JobFailed",
        "LeaseLost",
        "LeasedJob",
        "Manifest",
        "ModerationAction",
        "NotFound",
        "PayloadTooLarge",
        "ProgressCallback",
        "RangeNotSatisfiable",
        "RateLimited",
        "Report",
        "SearchResult",
        "SearchResults",
        "ServerError",
        "ServiceUnavailable",
        "SubmittedExpert",
        "TransportError",
        "Unauthenticated",
        "UnavailableForLegalReasons",
        "UnsupportedMediaType",
        "ValidationFailed",
    }
    assert set(sdk.__all__) == expected
    for name in sdk.__all__:
        assert getattr(sdk, name) is not None
    for name in expected - {"Agora", "ProgressCallback"}:
        obj = getattr(sdk, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            # Every error is an AgoraError; a warning is a UserWarning, never an error.
            if issubclass(obj, Warning):
                assert issubclass(obj, UserWarning), name
                assert not issubclass(obj, AgoraError), name
            else:
                assert issubclass(obj, AgoraError), name


def test_sdk_import_pulls_no_server_dependencies() -> None:
    code = (
        "import sys, registry.client;"
        "bad = {'fastapi','sqlalchemy','boto3','numpy','torch','registry.errors','starlette'}"
        " & set(sys.modules); print(sorted(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


# Every Agora method, with its parameters, and the resource method it delegates to.
AGORA_METHODS = {
    "submit_expert": (
        (
            "weights_path",
            "datasheet",
            "base_revision",
            "expert_id",
            "idempotency_key",
            "progress",
        ),
        "experts.submit",
    ),
    "list_experts_page": (
        ("base_revision", "status", "q", "limit", "cursor"),
        "experts.page",
    ),
    "list_experts": (("base_revision", "status", "q", "limit", "page_size"), "experts.list"),
    "get_expert": (("expert_id",), "experts.get"),
    "wait_for_arrival": (
        ("expert_id", "timeout", "interval", "on_poll"),
        "experts.wait_for_arrival",
    ),
    "get_datasheet": (("expert_id", "version"), "experts.datasheet"),
    "download": (("expert_id", "version", "dest", "progress"), "experts.download"),
    "search": (("texts", "base_revision", "k", "temperature"), "retrieval.search"),
    "nearest_expert": (("texts_or_path", "base_revision"), "retrieval.nearest"),
    "disable_expert": (("expert_id", "reason"), "moderation.disable"),
    "enable_expert": (("expert_id", "reason"), "moderation.enable"),
    "withdraw_expert": (("expert_id", "reason"), "experts.withdraw"),
    "restore_expert": (("expert_id", "reason"), "experts.restore"),
    "list_base_models": ((), "bases.list"),
    "get_base_model": (("revision",), "bases.get"),
    "upload_base_model": (
        ("config", "tokenizer", "weights", "name", "progress"),
        "bases.upload",
    ),
    "download_base_model": (("revision", "dest_dir", "progress"), "bases.download"),
    "compose": (
        (
            "method",
            "base_revision",
            "experts",
            "texts",
            "k",
            "weights",
            "params",
            "with_base",
            "base_weight",
            "temperature",
            "idempotency_key",
        ),
        "compositions.create",
    ),
    "get_composition": (("composition_id",), "compositions.get"),
    "composition": (("composition_id",), "compositions.handle"),
    "download_composition": (
        ("composition", "dest_dir", "progress"),
        "compositions.download",
    ),
    "load_composed": (("composition", "device", "progress"), "compositions.load"),
    "evaluate": (
        ("text_sets", "expert_id", "version", "composition_id", "idempotency_key"),
        "evaluations.create",
    ),
    "list_evaluations": (("expert_id", "composition_id"), "evaluations.list"),
    "get_job": (("job_id",), "jobs.get"),
    "job": (("job_id",), "jobs.handle"),
    "list_jobs": (("status", "kind", "limit"), "jobs.list"),
    "lease_job": (("worker", "kinds", "lease_seconds"), "jobs.lease"),
    "heartbeat_job": (("job_id", "fencing_token", "progress"), "jobs.heartbeat"),
    "complete_job": (
        ("job_id", "fencing_token", "result", "weights", "progress"),
        "jobs.complete",
    ),
    "fail_job": (("job_id", "fencing_token", "error", "retryable", "release"), "jobs.fail"),
}


def test_agora_methods_keep_their_signatures_and_match_their_resources(tmp_path: Path) -> None:
    agora = Agora("http://registry.test", cache_dir=tmp_path)
    public = {
        name
        for name, value in vars(Agora).items()
        if not name.startswith("_") and inspect.isfunction(value)
    }
    assert public == set(AGORA_METHODS) | {"close"}
    for name, (params, target) in AGORA_METHODS.items():
        method = inspect.signature(getattr(Agora, name))
        assert tuple(method.parameters)[1:] == params, name
        resource, attr = target.split(".")
        delegate = inspect.signature(getattr(getattr(agora, resource), attr))
        # The same parameters, kinds and defaults: the two spellings are one call.
        assert list(delegate.parameters.values()) == list(method.parameters.values())[1:], name


def test_resources_and_agora_methods_send_the_same_requests(tmp_path: Path) -> None:
    seen: list[tuple[str, str, bytes]] = []
    expert = {
        "id": "ex_01",
        "status": "active",
        "base_revision": "ab" * 32,
        "latest_version": 1,
    }

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, str(request.url), request.read()))
        if request.url.path == "/v1/search":
            return httpx.Response(200, json={"results": [], "embedder": "hash"})
        if request.url.path.endswith("/disable"):
            action = {
                "id": 1,
                "expert_id": "ex_01",
                "action": "disable",
                "status": "disabled",
                "reason": "spam",
                "actor": "mod",
            }
            return httpx.Response(200, json=action)
        return httpx.Response(200, json=expert)

    agora, _ = make_client(handler, tmp_path)
    assert agora.experts.get("ex_01") == agora.get_expert("ex_01")
    assert agora.retrieval.search("tide", "ab" * 32, k=2) == agora.search("tide", "ab" * 32, k=2)
    agora.moderation.disable("ex_01", "spam")
    agora.disable_expert("ex_01", "spam")
    assert seen[0::2] == seen[1::2]  # each pair: the resource's call, then Agora's
    assert [(m, u.removeprefix("http://registry.test")) for m, u, _ in seen[::2]] == [
        ("GET", "/v1/experts/ex_01"),
        ("POST", "/v1/search"),
        ("POST", "/v1/experts/ex_01/disable"),
    ]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequest),
        (401, Unauthenticated),
        (403, Forbidden),
        (404, NotFound),
        (409, Conflict),
        (413, PayloadTooLarge),
        (415, UnsupportedMediaType),
        (416, RangeNotSatisfiable),
        (418, BadRequest),
        (422, ValidationFailed),
        (451, UnavailableForLegalReasons),
    ],
)
def test_problem_json_maps_to_typed_error(tmp_path: Path, status: int, cls: type) -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return problem(status, "some_code", "what went wrong", errors=[{"loc": "x", "msg": "y"}])

    agora, _ = make_client(handler, tmp_path)
    with pytest.raises(cls) as info:
        agora.get_expert("ex_1")
    err = info.value
    assert type(err) is cls
    assert (err.status, err.code, err.detail) == (status, "some_code", "what went wrong")
    assert err.problem["status"] == status
    assert err.errors == [{"loc": "x", "msg": "y"}]
    assert "some_code" in str(err)
    assert len(calls) == 1  # 4xx are the caller's problem: never retried


def test_non_json_error_body_still_gives_typed_error(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="<html>bad gateway</html>")

    agora, sleeps = make_client(handler, tmp_path, max_retries=1)
    with pytest.raises(ServerError) as info:
        agora.get_expert("ex_1")
    assert info.value.status == 502
    assert info.value.code == "internal_error"
    assert "bad gateway" in info.value.detail
    assert len(sleeps) == 1


# --------------------------------------------------------------------------- retries


def test_submit_retried_on_503_reuses_idempotency_key_and_rewinds(tmp_path: Path) -> None:
    weights = tmp_path / "w.safetensors"
    payload = bytes(range(256)) * 1000
    weights.write_bytes(payload)
    seen: list[tuple[str, bytes]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.headers["Idempotency-Key"], request.read()))
        if len(seen) < 3:
            return problem(503, "database_unavailable")
        return httpx.Response(201, json=SUBMITTED)

    agora, sleeps = make_client(handler, tmp_path)
    result = agora.submit_expert(weights, "---\nname: x\n---\n", "rev")
    assert result.id == "ex_01"
    assert len(seen) == 3
    keys = {key for key, _ in seen}
    assert len(keys) == 1
    assert keys.pop().startswith("agora-")
    # Every attempt carried the whole file, not the tail left after the first read.
    assert all(body.count(payload) == 1 for _, body in seen)
    assert len(sleeps) == 2
    assert all(s > 0 for s in sleeps)
    assert sleeps[1] > sleeps[0] / 2  # backoff grows (jitter keeps it within a factor)


def test_submit_retried_after_connection_error_with_same_key(tmp_path: Path) -> None:
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x" * 10)
    keys: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers["Idempotency-Key"])
        if len(keys) == 1:
            raise httpx.ConnectError("connection refused", request=request)
        if len(keys) == 2:
            raise httpx.ReadTimeout("response lost", request=request)
        return httpx.Response(201, json=SUBMITTED)

    agora, _ = make_client(handler, tmp_path)
    agora.submit_expert(weights, "---\nname: x\n---\n", "rev", idempotency_key="my-key")
    assert keys == ["my-key"] * 3


def test_each_logical_post_gets_its_own_key(tmp_path: Path) -> None:
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    keys: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers["Idempotency-Key"])
        return httpx.Response(201, json=SUBMITTED)

    agora, _ = make_client(handler, tmp_path)
    agora.submit_expert(weights, "text\nmore", "rev")
    agora.submit_expert(weights, "text\nmore", "rev")
    assert len(set(keys)) == 2


def test_429_retry_after_is_honoured(tmp_path: Path) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            response = problem(429, "rate_limited")
            response.headers["Retry-After"] = "7"
            return response
        return httpx.Response(200, json={"items": [], "next_cursor": None})

    agora, sleeps = make_client(handler, tmp_path)
    assert list(agora.list_experts()) == []
    assert sleeps == [7.0]


def test_gives_up_after_max_retries_with_typed_error(tmp_path: Path) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        response = problem(429, "rate_limited")
        response.headers["Retry-After"] = "1"
        return response

    agora, sleeps = make_client(handler, tmp_path, max_retries=2)
    with pytest.raises(RateLimited) as info:
        agora.get_expert("ex_1")
    assert calls == 3
    assert sleeps == [1.0, 1.0]
    assert info.value.retry_after == 1.0


def test_connection_refused_becomes_transport_error(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    agora, sleeps = make_client(handler, tmp_path, max_retries=2)
    with pytest.raises(TransportError) as info:
        agora.get_expert("ex_1")
    assert info.value.status is None
    assert info.value.code == "transport_error"
    assert "Connection refused" in info.value.detail
    assert len(sleeps) == 2


def test_503_maps_to_service_unavailable(tmp_path: Path) -> None:
    agora, _ = make_client(lambda r: problem(503, "storage_unavailable"), tmp_path, max_retries=0)
    with pytest.raises(ServiceUnavailable) as info:
        agora.get_expert("ex_1")
    assert isinstance(info.value, ServerError)
    assert info.value.code == "storage_unavailable"


# --------------------------------------------------------------------------- listing


def test_list_experts_follows_cursors_and_stops_at_limit(tmp_path: Path) -> None:
    def expert(i: int) -> dict[str, object]:
        return {"id": f"ex_{i}", "status": "active", "base_revision": "r", "latest_version": 1}

    pages = {None: ([1, 2], "c1"), "c1": ([3, 4], "c2"), "c2": ([5], None)}
    requested: list[dict[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        params = dict(request.url.params)
        requested.append(params)
        ids, nxt = pages[params.get("cursor")]
        return httpx.Response(200, json={"items": [expert(i) for i in ids], "next_cursor": nxt})

    agora, _ = make_client(handler, tmp_path)
    assert [e.id for e in agora.list_experts(q="law", status="active")] == [
        f"ex_{i}" for i in range(1, 6)
    ]
    assert requested[0] == {"q": "law", "status": "active"}
    requested.clear()
    assert [e.id for e in agora.list_experts(limit=3)] == ["ex_1", "ex_2", "ex_3"]
    assert len(requested) == 2
    assert requested[0]["limit"] == "3"


# --------------------------------------------------------------------------- downloads


class FakeWeights:
    """Serves GET /v1/experts/ex_1 and its weights with Range, optionally misbehaving."""

    def __init__(self, blob: bytes, *, digest: str | None = None) -> None:
        self.blob = blob
        self.digest = digest or hashlib.sha256(blob).hexdigest()
        self.served = 0  # body bytes sent for weights requests
        self.ranges: list[str | None] = []
        self.break_after: int | None = None  # drop the connection after this many bytes
        self.serve_instead: bytes | None = None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/experts/ex_1":
            return httpx.Response(200, json=self.meta())
        assert request.url.path == "/v1/experts/ex_1/weights"
        blob = self.serve_instead if self.serve_instead is not None else self.blob
        rng = request.headers.get("Range")
        self.ranges.append(rng)
        start = int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0
        body = blob[start:]
        headers = {"X-Agora-Digest": f"sha256:{self.digest}", "Accept-Ranges": "bytes"}
        status = 200
        if rng:
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(blob) - 1}/{len(blob)}"
        return httpx.Response(status, headers=headers, stream=_Stream(self, body))

    def meta(self) -> dict[str, object]:
        return {
            "id": "ex_1",
            "status": "active",
            "base_revision": "r",
            "latest_version": 1,
            "versions": [
                {
                    "version": 1,
                    "digest": f"sha256:{self.digest}",
                    "size": len(self.blob),
                    "base_revision": "r",
                }
            ],
        }


class _Stream(httpx.SyncByteStream):
    def __init__(self, fake: FakeWeights, body: bytes) -> None:
        self.fake = fake
        self.body = body

    def __iter__(self) -> Iterator[bytes]:
        for i in range(0, len(self.body), 1000):
            if self.fake.break_after is not None and self.fake.served >= self.fake.break_after:
                self.fake.break_after = None
                raise httpx.ReadError("connection reset by peer")
            chunk = self.body[i : i + 1000]
            self.fake.served += len(chunk)
            yield chunk


def test_download_resumes_after_a_dropped_connection(tmp_path: Path) -> None:
    blob = bytes(range(256)) * 40  # 10240 bytes
    fake = FakeWeights(blob)
    fake.break_after = 4000
    agora, sleeps = make_client(fake, tmp_path)
    path = agora.download("ex_1")
    assert path.read_bytes() == blob
    assert fake.ranges == [None, "bytes=4000-"]
    assert fake.served == len(blob)  # nothing was sent twice
    assert len(sleeps) == 1


def test_download_of_wrong_bytes_raises_and_keeps_nothing(tmp_path: Path) -> None:
    blob = b"a" * 5000
    fake = FakeWeights(blob)
    fake.serve_instead = b"b" * 5000
    agora, _ = make_client(fake, tmp_path)
    with pytest.raises(DigestMismatch) as info:
        agora.download("ex_1", dest=tmp_path / "out.safetensors")
    assert info.value.code == "digest_mismatch"
    assert not (tmp_path / "out.safetensors").exists()
    kept = [p.name for p in (tmp_path / "cache" / "sha256").iterdir()]
    assert kept == [f"{fake.digest}.lock"]  # no blob, no .part


def test_concurrent_downloads_sharing_a_cache_transfer_once(tmp_path: Path) -> None:
    blob = bytes(range(256)) * 200
    fake = FakeWeights(blob)
    slow_stream = _Stream.__iter__

    def slow(self: _Stream) -> Iterator[bytes]:
        for chunk in slow_stream(self):
            time.sleep(0.002)  # long enough for the downloads to overlap
            yield chunk

    results: list[bytes] = []
    errors: list[BaseException] = []

    def fetch() -> None:
        agora, _ = make_client(fake, tmp_path)  # same cache directory for both
        try:
            results.append(agora.download("ex_1").read_bytes())
        except BaseException as exc:
            errors.append(exc)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_Stream, "__iter__", slow)
        threads = [threading.Thread(target=fetch) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    assert results == [blob, blob]
    assert fake.served == len(blob)  # the second waited for the first, then hit the cache


def test_download_of_unknown_version_is_not_found(tmp_path: Path) -> None:
    agora, _ = make_client(FakeWeights(b"x"), tmp_path)
    with pytest.raises(NotFound) as info:
        agora.download("ex_1", version=9)
    assert info.value.code == "version_not_found"


def test_progress_reports_reach_the_total(tmp_path: Path) -> None:
    blob = b"z" * 3500
    agora, _ = make_client(FakeWeights(blob), tmp_path)
    reports: list[tuple[int, int | None]] = []
    agora.download("ex_1", progress=lambda done, total: reports.append((done, total)))
    assert reports[-1] == (3500, 3500)
    assert [d for d, _ in reports] == sorted(d for d, _ in reports)


def test_error_base_class_catches_everything(tmp_path: Path) -> None:
    agora, _ = make_client(lambda r: problem(404, "expert_not_found"), tmp_path)
    with pytest.raises(AgoraError) as info:
        agora.get_datasheet("ex_nope")
    assert isinstance(info.value, NotFound)
    assert info.value.code == "expert_not_found"


def test_a_failing_disk_write_surfaces_and_the_writer_stops(tmp_path: Path) -> None:
    from registry.client.cache import HashingWriter

    class BrokenHasher:
        def update(self, data: bytes) -> None:
            raise OSError(28, "No space left on device")

    def fill(path: Path) -> HashingWriter:
        with HashingWriter(path, "wb", BrokenHasher()) as writer:  # type: ignore[arg-type]
            for _ in range(64):  # enough batches to reach the background thread
                writer.write(b"\0" * (256 << 10))
        return writer

    threads_before = threading.active_count()
    with pytest.raises(OSError, match="No space left"):
        fill(tmp_path / "x.part")
    assert threading.active_count() == threads_before  # the writer thread was joined
