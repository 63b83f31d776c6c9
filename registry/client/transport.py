"""The SDK's one transport: every request the resources make goes through ``Transport``.

Requests that fail without a response (connection refused or reset, timeouts), or that
the server answers with 429 or a 5xx, are retried with exponential backoff and jitter; a
429's or 503's ``Retry-After`` is honoured. Every POST carries an ``Idempotency-Key``
generated once per call and reused by its retries, so a retried submission is applied once
by the server even when the first attempt's response was lost.

Uploads stream from disk (``ProgressReader``); downloads (``fetch_blob``) stream to a
``.part`` file in the cache, hashing as they write, and never write past the size the
registry's metadata declared. A response that breaks off or ends short is resumed with
``Range`` (and ``If-Range``) from the bytes written; a 200 to a range request restarts the
part; a 206 whose ``Content-Range`` is not the range asked for ends the use of ranges for
that download. The part becomes the cached blob (an atomic rename) only once its size and
sha256 match the metadata; a mismatch is fetched once more from nothing, then raises
``DigestMismatch`` and keeps nothing. Interruptions that exhaust the retries raise
``DownloadInterrupted`` and keep the part for the next call to resume (docs/sdk.md,
"Downloads").
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
    DownloadIntegrityError,
    DownloadInterrupted,
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
        """Download ``path`` into the cache as the blob ``hexdigest`` of ``size`` bytes, verified.

        ``hexdigest`` and ``size`` come from the registry's metadata (the expert's versions,
        the base revision's files, a manifest), never from the download's own headers.
        Raises ``DigestMismatch`` (nothing kept) when the bytes do not hash to ``hexdigest``
        twice in a row, ``DownloadInterrupted`` (the bytes so far kept to resume) when the
        transfer keeps breaking off.
        """
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
        try:
            got = self._stream_to_part(
                path, params=params, part=part, hexdigest=hexdigest, size=size, progress=progress
            )
            if got != hexdigest and self.max_retries > 0:
                # A bad byte kept from an earlier call, or one corrupted on the way in any
                # response, looks the same from here: start over once, from nothing.
                part.unlink(missing_ok=True)
                got = self._stream_to_part(
                    path,
                    params=params,
                    part=part,
                    hexdigest=hexdigest,
                    size=size,
                    progress=progress,
                )
        except DownloadIntegrityError:
            part.unlink(missing_ok=True)
            raise
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
        """Fill ``part`` with the blob (resuming what is there); the sha256 hex of its bytes.

        Returns once ``part`` holds ``size`` bytes (``size`` None: once a response ended
        where its framing said). A response that breaks off or ends short is resumed with a
        Range request after the bytes written; bytes past ``size`` are never written. The
        caller compares the digest.
        """
        state = _PartState(part, size)
        use_range = True
        failures = 0  # consecutive attempts that broke off without adding a byte
        attempts = 0
        max_attempts = ATTEMPTS_PER_RETRY * (self.max_retries + 1)
        while not state.complete:
            attempts += 1
            added_before = state.added
            try:
                self._download_attempt(
                    path,
                    params=params,
                    state=state,
                    hexdigest=hexdigest,
                    use_range=use_range,
                    progress=progress,
                )
                continue
            except _BadRange as exc:
                # A proxy that mangles ranges: from now on ask for the whole blob.
                use_range = False
                reason = str(exc)
            except _ShortBody as exc:
                reason = str(exc)
            except _RETRYABLE_EXC as exc:
                reason = f"{type(exc).__name__}: {exc}"
            except TransportError as exc:
                # No response at all, after request()'s own retries.
                raise DownloadInterrupted(
                    f"download of {path} failed: {exc.detail}; {_kept(state)}",
                    received=state.length,
                    size=size,
                ) from exc
            if state.complete:
                # Every byte arrived before the response broke its framing (a Content-Length
                # longer than the body): the digest decides, no request needed.
                break
            failures = 1 if state.added > added_before else failures + 1
            if failures > self.max_retries or attempts >= max_attempts:
                raise DownloadInterrupted(
                    f"download of {path} broke off {attempts} time(s), last: {reason}; "
                    f"{_kept(state)}",
                    received=state.length,
                    size=size,
                )
            self.sleep(self.backoff(failures - 1))
        return state.hasher.hexdigest()

    def _download_attempt(
        self,
        path: str,
        *,
        params: Mapping[str, Any] | None,
        state: _PartState,
        hexdigest: str,
        use_range: bool,
        progress: ProgressCallback | None,
    ) -> None:
        """One GET appending to ``state``; raises ``_ShortBody``/``_BadRange`` or a network
        error for the caller to retry."""
        ranged = use_range and state.length > 0
        # Byte ranges are offsets into the stored bytes, so ask for them uncompressed.
        headers = {"Accept-Encoding": "identity"}
        if ranged:
            headers["Range"] = f"bytes={state.length}-"
            # The registry's ETag is the blob's digest: a cache that holds other bytes under
            # this URL must answer with its whole body (a 200) rather than a range of it.
            headers["If-Range"] = f'"{hexdigest}"'
        also_ok = frozenset({416}) if ranged else frozenset()
        with self.stream("GET", path, params=params, headers=headers, also_ok=also_ok) as response:
            advertised = _digest_or_none(response.headers.get("X-Agora-Digest"))
            if advertised is not None and advertised != hexdigest:
                raise DigestMismatch(
                    f"the registry serves sha256:{advertised} where its metadata declared "
                    f"sha256:{hexdigest}; nothing was kept"
                )
            if response.status_code == 416:
                total = content_range_total(response.headers.get("Content-Range"))
                if total == state.length and (state.size is None or total == state.size):
                    state.done = True  # nothing left after the part: the digest decides
                    return
                asked = state.length
                state.restart()
                raise _ShortBody(f"the range from byte {asked} was refused (blob of {total})")
            if response.status_code == 206:
                problem = _range_problem(
                    response.headers.get("Content-Range"), state.length, state.size
                )
                if problem is not None:
                    raise _BadRange(problem)
            else:
                # Any other 2xx is the whole blob: the server (or a proxy) ignored the
                # range, so whatever the part held is replaced.
                state.restart()
            encoded = response.headers.get("Content-Encoding", "identity")
            # iter_raw skips httpx's decoder layer; only a server that ignored our
            # Accept-Encoding needs the decoding iterator.
            chunks = (
                response.iter_raw()
                if encoded.strip().lower() == "identity"
                else response.iter_bytes()
            )
            # The writer is closed (every chunk received is on disk and hashed) before an
            # exception leaves this block, so ``state.length`` is exactly the part's size.
            with HashingWriter(state.path, "ab", state.hasher) as out:
                for chunk in chunks:
                    room = state.room()
                    data = chunk if room is None or len(chunk) <= room else chunk[:room]
                    if data:
                        out.write(data)
                        state.wrote(len(data))
                        if progress is not None:
                            progress(state.length, state.size)
                    if len(data) < len(chunk):
                        # More bytes than the blob has (a Content-Length that lies, junk
                        # appended): the first ``size`` are kept and the digest decides.
                        break
        if state.size is None:
            state.done = True
        elif state.length < state.size:
            raise _ShortBody(f"the response ended after {state.length} of {state.size} bytes")


# A download whose attempts keep adding bytes does not use up its retries (a flaky link still
# finishes a large file), but it makes at most this many times (max_retries + 1) requests, so
# a link that trickles a few bytes per connection still ends.
ATTEMPTS_PER_RETRY = 4


class _ShortBody(Exception):
    """A response ended (or was refused) before the blob's last byte: resume."""


class _BadRange(Exception):
    """A 206 whose Content-Range is not the range asked for: stop asking for ranges."""


class _PartState:
    """The ``.part`` file of one download: its length and the sha256 of its bytes so far."""

    def __init__(self, path: Path, size: int | None) -> None:
        self.path = path
        self.size = size
        self.hasher = hashlib.sha256()
        self.length = 0
        self.added = 0  # bytes written by this download, across restarts
        self.done = False
        if path.exists():
            kept = path.stat().st_size
            if size is not None and kept > size:
                path.unlink()
            else:
                # Hash what is kept (an earlier, interrupted call) so the digest covers it all.
                sha256_file(path, self.hasher)
                self.length = kept

    @property
    def complete(self) -> bool:
        return self.done or (self.size is not None and self.length >= self.size)

    def room(self) -> int | None:
        return None if self.size is None else self.size - self.length

    def wrote(self, n: int) -> None:
        self.length += n
        self.added += n

    def restart(self) -> None:
        self.path.unlink(missing_ok=True)
        self.hasher = hashlib.sha256()
        self.length = 0


def _kept(state: _PartState) -> str:
    total = "?" if state.size is None else str(state.size)
    return f"{state.length} of {total} bytes kept in {state.path.name} to resume"


def _digest_or_none(value: str | None) -> str | None:
    """The hex of a well-formed ``sha256:<hex>`` header, None if absent or not one."""
    if value is None:
        return None
    try:
        return parse_digest(value)
    except ValueError:
        return None


def _range_problem(value: str | None, offset: int, size: int | None) -> str | None:
    """Why a 206's ``Content-Range`` (``bytes a-b/N``) is not a range from ``offset`` of the
    blob of ``size`` bytes; None when it is."""
    if not value or not value.startswith("bytes "):
        return f"a 206 without a byte Content-Range ({value!r})"
    span, _, total = value[len("bytes ") :].partition("/")
    first, _, last = span.partition("-")
    if not (first.strip().isdigit() and last.strip().isdigit()):
        return f"a malformed Content-Range {value!r}"
    start, end = int(first), int(last)
    if start != offset:
        return f"asked for bytes from {offset}, got a range from {start}"
    if end < start:
        return f"a backwards Content-Range {value!r}"
    if size is not None:
        if total.strip() != "*" and total.strip() != str(size):
            return f"a Content-Range of a {total}-byte blob, the registry declared {size}"
        if end >= size:
            return f"a Content-Range past the blob's {size} bytes ({value!r})"
    return None


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
