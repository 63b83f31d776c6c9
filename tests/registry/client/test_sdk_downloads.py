"""Download integrity, request by request: a scripted registry (``httpx.MockTransport``)
answers each weights request the way a broken network or proxy might, and the tests check
what the SDK asks next and what it keeps (docs/sdk.md, "Downloads").

tests/adversarial/test_sdk_download.py runs the same faults against a real server through a
real proxy; these pin the exact requests and the errors' fields.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from registry.client import (
    Agora,
    DigestMismatch,
    DownloadIntegrityError,
    DownloadInterrupted,
    TransportError,
)
from registry.client.cache import place

BLOB = bytes(range(256)) * 64  # 16 KiB
DIGEST = hashlib.sha256(BLOB).hexdigest()

# (request number among weights requests, start asked for, the request) -> response
Answer = Callable[[int, int, httpx.Request], httpx.Response]


class Body(httpx.SyncByteStream):
    """``data`` in 1000-byte chunks, then optionally a network error."""

    def __init__(self, data: bytes, error: Exception | None = None) -> None:
        self.data = data
        self.error = error

    def __iter__(self) -> Iterator[bytes]:
        for i in range(0, len(self.data), 1000):
            yield self.data[i : i + 1000]
        if self.error is not None:
            raise self.error


def ranged(start: int, data: bytes, error: Exception | None = None) -> httpx.Response:
    """A 206 from ``start`` that carries ``data`` (maybe less than the rest of the blob)."""
    headers = {"Content-Range": f"bytes {start}-{len(BLOB) - 1}/{len(BLOB)}"}
    return httpx.Response(206, headers=headers, stream=Body(data, error))


def honest(n: int, start: int, request: httpx.Request, *, blob: bytes = BLOB) -> httpx.Response:
    headers = {"X-Agora-Digest": f"sha256:{DIGEST}", "ETag": f'"{DIGEST}"'}
    if request.headers.get("Range"):
        headers["Content-Range"] = f"bytes {start}-{len(blob) - 1}/{len(blob)}"
        return httpx.Response(206, headers=headers, stream=Body(blob[start:]))
    return httpx.Response(200, headers=headers, stream=Body(blob))


class Registry:
    """GET /v1/experts/ex_1 (metadata from the API) and its weights, answered by ``script``
    (one answer per weights request; honest ones after the script runs out)."""

    def __init__(self, *script: Answer) -> None:
        self.script = list(script)
        self.requests: list[httpx.Request] = []
        self.read = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/experts/ex_1":
            version = {"version": 1, "digest": f"sha256:{DIGEST}", "size": len(BLOB)}
            return httpx.Response(
                200,
                json={
                    "id": "ex_1",
                    "status": "active",
                    "base_revision": "r",
                    "latest_version": 1,
                    "versions": [{**version, "base_revision": "r"}],
                },
            )
        n = len(self.requests)
        self.requests.append(request)
        rng = request.headers.get("Range")
        start = int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0
        answer = self.script[n] if n < len(self.script) else honest
        return answer(n, start, request)

    @property
    def ranges(self) -> list[str | None]:
        return [r.headers.get("Range") for r in self.requests]


def make(registry: Registry, tmp_path: Path, **kwargs: object) -> tuple[Agora, list[float]]:
    agora = Agora(
        "http://registry.test",
        transport=httpx.MockTransport(registry),
        cache_dir=tmp_path / "cache",
        **kwargs,  # type: ignore[arg-type]
    )
    sleeps: list[float] = []
    agora._sleep = sleeps.append
    return agora, sleeps


def parts(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "cache" / "sha256").glob("*.part"))


def test_a_short_but_complete_looking_body_is_resumed_with_if_range(tmp_path: Path) -> None:
    def short(n: int, start: int, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Body(BLOB[:6000]))  # framing says this is all

    registry = Registry(short)
    agora, sleeps = make(registry, tmp_path)
    out = agora.download("ex_1", dest=tmp_path / "out.bin")
    assert out.read_bytes() == BLOB
    assert registry.ranges == [None, "bytes=6000-"]
    assert registry.requests[1].headers["If-Range"] == f'"{DIGEST}"'
    assert len(sleeps) == 1
    assert parts(tmp_path) == []


def test_bytes_past_the_declared_size_are_never_written(tmp_path: Path) -> None:
    def longer(n: int, start: int, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Body(BLOB + b"\xff" * 5000))

    registry = Registry(longer)
    agora, _ = make(registry, tmp_path)
    out = agora.download("ex_1")
    assert out.read_bytes() == BLOB
    assert registry.ranges == [None]


def test_all_bytes_then_a_broken_framing_needs_no_second_request(tmp_path: Path) -> None:
    def lying_length(n: int, start: int, request: httpx.Request) -> httpx.Response:
        # Content-Length said more than was sent: the body ends with a protocol error.
        error = httpx.RemoteProtocolError("peer closed connection without sending complete body")
        return httpx.Response(200, stream=Body(BLOB, error))

    registry = Registry(lying_length)
    agora, sleeps = make(registry, tmp_path, max_retries=0)
    assert agora.download("ex_1").read_bytes() == BLOB
    assert registry.ranges == [None]
    assert sleeps == []


def test_a_206_from_the_wrong_offset_ends_the_use_of_ranges(tmp_path: Path) -> None:
    def dropped(n: int, start: int, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Body(BLOB[:5000], httpx.ReadError("reset")))

    def mislabelled(n: int, start: int, request: httpx.Request) -> httpx.Response:
        headers = {"Content-Range": f"bytes 0-{len(BLOB) - 1}/{len(BLOB)}"}
        return httpx.Response(206, headers=headers, stream=Body(BLOB))

    registry = Registry(dropped, mislabelled)
    agora, _ = make(registry, tmp_path)
    assert agora.download("ex_1").read_bytes() == BLOB
    assert registry.ranges == [None, "bytes=5000-", None]


@pytest.mark.parametrize(
    "content_range",
    [f"bytes 5000-{len(BLOB) - 1}/{len(BLOB) + 1}", "bytes 5000-x/16384", None],
)
def test_a_206_of_another_blob_or_without_a_range_is_not_appended(
    tmp_path: Path, content_range: str | None
) -> None:
    def dropped(n: int, start: int, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Body(BLOB[:5000], httpx.ReadError("reset")))

    def bad(n: int, start: int, request: httpx.Request) -> httpx.Response:
        headers = {"Content-Range": content_range} if content_range else {}
        return httpx.Response(206, headers=headers, stream=Body(b"\0" * (len(BLOB) - 5000)))

    registry = Registry(dropped, bad)
    agora, _ = make(registry, tmp_path)
    assert agora.download("ex_1").read_bytes() == BLOB
    assert registry.ranges == [None, "bytes=5000-", None]


def test_a_200_to_a_range_request_replaces_the_part(tmp_path: Path) -> None:
    def dropped(n: int, start: int, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Body(BLOB[:7000], httpx.ReadError("reset")))

    def whole(n: int, start: int, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Body(BLOB))  # the range was ignored

    registry = Registry(dropped, whole)
    agora, _ = make(registry, tmp_path)
    assert agora.download("ex_1").read_bytes() == BLOB
    assert registry.ranges == [None, "bytes=7000-"]


def test_interruptions_without_progress_raise_and_keep_the_part_to_resume(
    tmp_path: Path,
) -> None:
    def first(n: int, start: int, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Body(BLOB[:3000], httpx.ReadError("reset")))

    def nothing(n: int, start: int, request: httpx.Request) -> httpx.Response:
        return ranged(start, b"", httpx.ReadError("reset"))

    registry = Registry(first, nothing, nothing)
    agora, sleeps = make(registry, tmp_path, max_retries=2)
    with pytest.raises(DownloadInterrupted) as info:
        agora.download("ex_1", dest=tmp_path / "out.bin")
    error = info.value
    assert isinstance(error, TransportError)
    assert (error.code, error.received, error.size) == ("download_interrupted", 3000, len(BLOB))
    # The first attempt added bytes, then two retries added none.
    assert registry.ranges == [None, "bytes=3000-", "bytes=3000-"]
    assert len(sleeps) == 2
    assert not (tmp_path / "out.bin").exists()
    (part,) = parts(tmp_path)
    assert part.read_bytes() == BLOB[:3000]

    # The next call resumes after the kept bytes.
    assert agora.download("ex_1", dest=tmp_path / "out.bin").read_bytes() == BLOB
    assert registry.ranges[-1] == "bytes=3000-"
    assert parts(tmp_path) == []


def test_attempts_that_keep_adding_bytes_continue_up_to_a_cap(tmp_path: Path) -> None:
    def trickle(n: int, start: int, request: httpx.Request) -> httpx.Response:
        data = BLOB[start : start + 1000]
        return ranged(start, data) if start else httpx.Response(200, stream=Body(data))

    # 1000 bytes a response: 17 responses for the whole blob, more than 4 x (3 + 1).
    registry = Registry(*[trickle] * 100)
    agora, _ = make(registry, tmp_path)
    with pytest.raises(DownloadInterrupted) as info:
        agora.download("ex_1")
    assert len(registry.requests) == 16
    assert info.value.received == 16_000

    # With 4000-byte responses the same link finishes (5 responses), each one resumed.
    def wider(n: int, start: int, request: httpx.Request) -> httpx.Response:
        data = BLOB[start : start + 4000]
        return ranged(start, data) if start else httpx.Response(200, stream=Body(data))

    other = Registry(*[wider] * 100)
    agora, _ = make(other, tmp_path / "other")
    assert agora.download("ex_1").read_bytes() == BLOB
    assert other.ranges == [None, "bytes=4000-", "bytes=8000-", "bytes=12000-", "bytes=16000-"]


def test_a_corrupted_transfer_is_fetched_once_more_from_nothing(tmp_path: Path) -> None:
    def flipped(n: int, start: int, request: httpx.Request) -> httpx.Response:
        body = bytearray(BLOB)
        body[9000] ^= 1
        return httpx.Response(200, stream=Body(bytes(body)))

    registry = Registry(flipped)
    agora, _ = make(registry, tmp_path)
    assert agora.download("ex_1").read_bytes() == BLOB
    assert registry.ranges == [None, None]

    # Without retries the first mismatch is final, and nothing is kept.
    registry = Registry(flipped)
    agora, _ = make(registry, tmp_path / "no-retries", max_retries=0)
    with pytest.raises(DigestMismatch):
        agora.download("ex_1", dest=tmp_path / "out.bin")
    assert len(registry.requests) == 1
    assert not (tmp_path / "out.bin").exists()
    assert parts(tmp_path / "no-retries") == []


def test_a_response_naming_another_digest_is_refused_at_once(tmp_path: Path) -> None:
    def other(n: int, start: int, request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"X-Agora-Digest": "sha256:" + "0" * 64}, stream=Body(BLOB)
        )

    def dropped(n: int, start: int, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Body(BLOB[:4000], httpx.ReadError("reset")))

    # A part from an earlier response is dropped too: an integrity error keeps nothing.
    registry = Registry(dropped, other)
    agora, _ = make(registry, tmp_path)
    with pytest.raises(DigestMismatch) as info:
        agora.download("ex_1", dest=tmp_path / "out.bin")
    assert isinstance(info.value, DownloadIntegrityError)
    assert len(registry.requests) == 2
    assert parts(tmp_path) == []
    assert not (tmp_path / "out.bin").exists()


def test_a_copy_to_the_destination_is_verified_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "blob"
    source.write_bytes(BLOB)

    def no_links(src: object, dst: object) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    dest = tmp_path / "out" / "copy.bin"
    assert place(source, dest, DIGEST).read_bytes() == BLOB

    source.write_bytes(BLOB[:-1] + b"\0")  # the cached file changed under us
    other = tmp_path / "out" / "other.bin"
    with pytest.raises(DigestMismatch):
        place(source, other, DIGEST)
    assert sorted(p.name for p in other.parent.iterdir()) == ["copy.bin"]
