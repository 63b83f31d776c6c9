"""The SDK's one transport: every request the resources make goes through ``Transport``.

Requests that fail without a response (connection refused or reset, timeouts), or that
the server answers with 429 or a 5xx, are retried with exponential backoff and jitter; a
429's or 503's ``Retry-After`` is honoured. Every POST carries an ``Idempotency-Key``
generated once per call and reused by its retries, so a retried submission is applied once
by the server even when the first attempt's response was lost.

Uploads stream from disk (``ProgressReader``); downloads (``fetch_blob``) stream to a
``.part`` file in the cache, resume it with ``Range`` after an interruption, and are
sha256-verified against the registry's digest before they are returned.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from registry.client.cache import BlobCache, HashingWriter, parse_digest, sha256_file
from registry.client.errors import (
    AgoraError,
    DigestMismatch,
    TransportError,
    content_range_total,
    error_from_response,
    parse_retry_after,
)

# Reads may wait on the server validating a large upload (it hashes and scans every value
# after the last byte arrives), so the read timeout is generous; connecting is not.
DEFAULT_TIMEOUT = httpx.Timeout(120.0, connect=10.0)
BACKOFF_CAP_S = 8.0
RETRY_AFTER_CAP_S = 60.0

ProgressCallback = Callable[[int, int | None], None]
"""Called with (bytes done, total bytes or None) as a transfer advances."""

_M = TypeVar("_M", bound=BaseModel)

# Failures where no response arrived, or the connection broke mid-response. Other httpx
# transport errors (an unsupported scheme, a bad proxy configuration) will not heal by retrying.
_RETRYABLE_EXC = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


def _retryable_status(status: int) -> bool:
    return status == 429 or status >= 500


class ProgressReader:
    """A binary file wrapper that reports how far httpx has read it.

    httpx's multipart encoder seeks every file to 0 before sending, so a retried attempt
    restarts the count too; ``fileno`` lets httpx take the length from ``fstat`` and send a
    Content-Length instead of chunked encoding.
    """

    def __init__(self, raw: IO[bytes], total: int, progress: ProgressCallback | None) -> None:
        self._raw = raw
        self._total = total
        self._progress = progress
        self._done = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._raw.read(size)
        self._done += len(chunk)
        if self._progress is not None and chunk:
            self._progress(self._done, self._total)
        return chunk

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        position = self._raw.seek(offset, whence)
        self._done = position
        return position

    def tell(self) -> int:
        return self._raw.tell()

    def fileno(self) -> int:
        return self._raw.fileno()


def reader_of(raw: IO[bytes], progress: ProgressCallback | None) -> ProgressReader:
    """``raw`` (an open file) wrapped to report ``progress`` against its whole size."""
    return ProgressReader(raw, os.fstat(raw.fileno()).st_size, progress)


class Transport:
    """httpx with the SDK's retries, idempotency keys, typed errors and verified downloads.

    Every wait goes through ``sleep`` and every deadline reads ``clock`` (``time.sleep``
    and ``time.monotonic`` from ``Agora``): attributes, so tests observe the delays
    without waiting them out.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        cache: BlobCache,
        sleep: Callable[[float], None],
        clock: Callable[[], float],
        transport: httpx.BaseTransport | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        max_retries: int = 3,
        backoff_factor: float = 0.5,
    ) -> None:
        headers = {"User-Agent": "agora-sdk/0.1"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.backoff_factor = backoff_factor
        self.cache = cache
        self.http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )
        self.sleep = sleep
        self.clock = clock

    def close(self) -> None:
        self.http.close()

    # -- requests --------------------------------------------------------------------------

    def backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter: half fixed, half random, capped."""
        delay = min(BACKOFF_CAP_S, self.backoff_factor * 2.0**attempt)
        return delay / 2 + random.uniform(0, delay / 2)

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        data: Mapping[str, Any] | None = None,
        files: Mapping[str, Any] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        rewind: list[IO[bytes]] | None = None,
        idempotency_key: str | None = None,
        stream: bool = False,
        also_ok: frozenset[int] = frozenset(),
    ) -> httpx.Response:
        """Send with retries; returns a 2xx (or ``also_ok``) response, else raises a typed error.

        ``rewind`` are the files a multipart body reads, sought back to 0 before each attempt.
        """
        all_headers = dict(headers or {})
        if method == "POST":
            # One key per logical call, reused by every retry of it.
            all_headers["Idempotency-Key"] = idempotency_key or f"agora-{uuid.uuid4().hex}"
        attempt = 0
        while True:
            for raw in rewind or ():
                raw.seek(0)
            request = self.http.build_request(
                method, path, params=params, data=data, files=files, json=json, headers=all_headers
            )
            try:
                response = self.http.send(request, stream=stream)
            except _RETRYABLE_EXC as exc:
                if attempt >= self.max_retries:
                    raise TransportError(
                        f"{method} {self.base_url}{path} failed after {attempt + 1} "
                        f"attempt(s): {exc or type(exc).__name__}"
                    ) from exc
                delay = self.backoff(attempt)
            except httpx.HTTPError as exc:
                raise TransportError(f"{method} {self.base_url}{path}: {exc}") from exc
            else:
                if response.is_success or response.status_code in also_ok:
                    return response
                if stream:
                    response.read()
                response.close()
                if not _retryable_status(response.status_code) or attempt >= self.max_retries:
                    raise error_from_response(response)
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                delay = (
                    min(retry_after, RETRY_AFTER_CAP_S)
                    if retry_after is not None
                    else self.backoff(attempt)
                )
            self.sleep(delay)
            attempt += 1

    def get(self, model: type[_M], path: str, params: Mapping[str, Any] | None = None) -> _M:
        """GET ``path`` and parse the JSON answer as ``model``."""
        return parse(model, self.request("GET", path, params=params))

    def post(
        self, model: type[_M], path: str, body: Any, *, idempotency_key: str | None = None
    ) -> _M:
        """POST ``body`` as JSON and parse the answer as ``model``."""
        response = self.request("POST", path, json=body, idempotency_key=idempotency_key)
        return parse(model, response)

    @contextlib.contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        response = self.request(method, path, stream=True, **kwargs)
        try:
            yield response
        finally:
            response.close()

    # -- verified downloads ----------------------------------------------------------------

    def cached_or_fetch(
        self,
        path: str,
        *,
        params: Mapping[str, Any] | None,
        digest: str,
        size: int | None,
        progress: ProgressCallback | None,
    ) -> Path:
        """The cached blob of ``digest`` (``sha256:<hex>``), fetched from ``path`` if absent."""
        hexdigest = parse_digest(digest)
        return self.cache.lookup(hexdigest) or self.fetch_blob(
            path, params=params, hexdigest=hexdigest, size=size, progress=progress
        )

    def fetch_blob(
        self,
        path: str,
        *,
        params: Mapping[str, Any] | None,
        hexdigest: str,
        size: int | None,
        progress: ProgressCallback | None,
    ) -> Path:
        """Download ``path`` into the cache as the blob ``hexdigest``, verified."""
        with self.cache.locked(hexdigest):
            # Another process (or thread) sharing this cache may have fetched it meanwhile.
            cached = self.cache.lookup(hexdigest)
            if cached is not None:
                return cached
            return self._fetch_blob_locked(
                path, params=params, hexdigest=hexdigest, size=size, progress=progress
            )

    def _fetch_blob_locked(
        self,
        path: str,
        *,
        params: Mapping[str, Any] | None,
        hexdigest: str,
        size: int | None,
        progress: ProgressCallback | None,
    ) -> Path:
        part = self.cache.part_path(hexdigest)
        resumed = part.exists() and part.stat().st_size > 0
        got = self._stream_to_part(
            path, params=params, part=part, hexdigest=hexdigest, size=size, progress=progress
        )
        if got != hexdigest and resumed:
            # The bytes kept from an earlier attempt may be the bad ones: start over once.
            part.unlink(missing_ok=True)
            got = self._stream_to_part(
                path, params=params, part=part, hexdigest=hexdigest, size=size, progress=progress
            )
        if got != hexdigest:
            part.unlink(missing_ok=True)
            raise DigestMismatch(
                f"downloaded bytes hash to sha256:{got}, the registry advertised "
                f"sha256:{hexdigest}; nothing was kept"
            )
        return self.cache.commit(part, hexdigest)

    def _stream_to_part(
        self,
        path: str,
        *,
        params: Mapping[str, Any] | None,
        part: Path,
        hexdigest: str,
        size: int | None,
        progress: ProgressCallback | None,
    ) -> str:
        """Stream the blob into ``part`` (resuming what is there); the sha256 hex of it all."""
        hasher = hashlib.sha256()
        offset = 0
        if part.exists():
            offset = part.stat().st_size
            if size is not None and offset > size:
                part.unlink()
                offset = 0
            else:
                # Hash what is kept so the final digest covers the whole file.
                sha256_file(part, hasher)
                if offset == size:
                    # Complete but never renamed (interrupted at the end): the caller's
                    # digest check decides, no request needed.
                    return hasher.hexdigest()
        failures = 0
        while True:
            # Byte ranges are offsets into the stored bytes, so ask for them uncompressed.
            headers = {"Accept-Encoding": "identity"}
            if offset:
                headers["Range"] = f"bytes={offset}-"
            try:
                with self.stream(
                    "GET", path, params=params, headers=headers, also_ok=frozenset({416})
                ) as response:
                    if response.status_code == 416:
                        # Nothing left to send from `offset`: either the part is complete
                        # (the digest check decides) or it is longer than the blob.
                        total = content_range_total(response.headers.get("Content-Range"))
                        if total is not None and total == offset:
                            return hasher.hexdigest()
                        hasher, offset = hashlib.sha256(), 0
                        part.unlink(missing_ok=True)
                        failures += 1
                        if failures > self.max_retries:
                            raise AgoraError(
                                "the registry refused every byte range",
                                status=416,
                                code="range_not_satisfiable",
                            )
                        continue
                    if response.status_code == 206:
                        start = _content_range_start(response.headers.get("Content-Range"))
                        if start != offset:
                            raise AgoraError(
                                f"asked for bytes from {offset}, got a range from {start}",
                                status=206,
                                code="bad_content_range",
                            )
                        mode = "ab"
                    else:
                        # A 200 is the whole blob: the server ignored (or could not honour)
                        # the range, so whatever the part held is replaced.
                        hasher, offset, mode = hashlib.sha256(), 0, "wb"
                    advertised = response.headers.get("X-Agora-Digest")
                    if advertised is not None and parse_digest(advertised) != hexdigest:
                        raise DigestMismatch(
                            f"the registry serves {advertised} where sha256:{hexdigest} "
                            "was expected"
                        )
                    # The writer is closed (every chunk received is on disk) before an
                    # exception leaves this block, so `offset` is exactly the part's size.
                    with HashingWriter(part, mode, hasher) as out:
                        encoded = response.headers.get("Content-Encoding", "identity")
                        # iter_raw skips httpx's decoder layer; only a server that ignored
                        # our Accept-Encoding needs the decoding iterator.
                        chunks = (
                            response.iter_raw()
                            if encoded.strip().lower() == "identity"
                            else response.iter_bytes()
                        )
                        for chunk in chunks:
                            out.write(chunk)
                            offset += len(chunk)
                            if progress is not None:
                                progress(offset, size)
                return hasher.hexdigest()
            except _RETRYABLE_EXC as exc:
                # The connection broke mid-body: what arrived is on disk, resume after it.
                failures += 1
                if failures > self.max_retries:
                    raise TransportError(f"download of {path} failed: {exc}") from exc
                self.sleep(self.backoff(failures - 1))


# -- response helpers -------------------------------------------------------------------------


def seg(value: str) -> str:
    """A path segment, percent-encoded so an id can never add path components."""
    return quote(value, safe="")


def without_none(params: Mapping[str, Any]) -> dict[str, Any]:
    """Query parameters with the unset (None) ones left out."""
    return {k: v for k, v in params.items() if v is not None}


def json_body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise AgoraError(
            f"the registry answered {response.request.method} {response.request.url.path} "
            "with a body that is not JSON",
            status=response.status_code,
            code="bad_response",
        ) from exc


def items(response: httpx.Response) -> list[Any]:
    """The ``items`` of a list answer (``{"items": [...]}``)."""
    body = json_body(response)
    found = body.get("items") if isinstance(body, dict) else None
    if not isinstance(found, list):
        raise AgoraError(
            f"unexpected response to {response.request.method} {response.request.url.path}",
            status=response.status_code,
            code="bad_response",
        )
    return found


def parse(model: type[_M], response: httpx.Response) -> _M:
    return model.model_validate(json_body(response))


def _content_range_start(value: str | None) -> int | None:
    # "bytes 100-199/1000"
    if not value or not value.startswith("bytes "):
        return None
    span = value[len("bytes ") :].split("/", 1)[0]
    start, _, _ = span.partition("-")
    return int(start) if start.strip().isdigit() else None
