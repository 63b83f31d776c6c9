"""Streaming blob responses with single-range HTTP Range support (RFC 9110 section 14)."""

from __future__ import annotations

import re
from collections.abc import Iterator

from fastapi.responses import Response, StreamingResponse

from registry.errors import RangeNotSatisfiable
from registry.runtime import Runtime

# ASCII digits, at most 19: a position past any blob needs no more (and int() of the
# digits is then cheap, never refused for length).
_RANGE = re.compile(r"^bytes=([0-9]{0,19})-([0-9]{0,19})$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, stop) with stop exclusive, or None to send the whole blob.

    Multiple ranges and syntactically invalid headers are ignored (a full 200), as RFC 9110
    allows; a well-formed range that misses the blob is a 416.
    """
    if not header:
        return None
    match = _RANGE.match(header.strip().replace(" ", ""))
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix range: the last N bytes
        length = int(last)
        if length == 0:
            raise _unsatisfiable(size)
        return max(size - length, 0), size
    start = int(first)
    stop = size if not last else min(int(last) + 1, size)
    if last and int(last) < start:
        return None
    if start >= size:
        raise _unsatisfiable(size)
    return start, stop


def _unsatisfiable(size: int) -> RangeNotSatisfiable:
    return RangeNotSatisfiable(
        f"the requested range is outside the blob of {size} bytes", size=size
    )


def blob_response(
    *,
    runtime: Runtime,
    digest: str,
    storage_key: str,
    size: int,
    range_header: str | None,
    media_type: str,
    kind: str,
    filename: str | None = None,
    head: bool = False,
) -> Response:
    byte_range = parse_range(range_header, size)
    start, stop = byte_range if byte_range is not None else (0, size)
    headers = {
        "Accept-Ranges": "bytes",
        "X-Agora-Digest": f"sha256:{digest}",
        # Content-addressed: the bytes under this ETag can never change.
        "ETag": f'"{digest}"',
        "Cache-Control": "public, max-age=31536000, immutable",
        "Content-Length": str(stop - start),
    }
    if filename:
        headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    if byte_range is not None:
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    status = 206 if byte_range is not None else 200
    if head:
        # HEAD: the same headers (size, digest, range) and no body, without touching storage.
        return Response(status_code=status, media_type=media_type, headers=headers)
    metrics = runtime.metrics

    def body() -> Iterator[bytes]:
        # A sync iterator: Starlette runs it in a worker thread, so disk or S3 reads never
        # block the event loop.
        for chunk in runtime.store.iter_range(storage_key, start, stop):
            metrics.record_download(kind=kind, size=len(chunk))
            yield chunk

    return StreamingResponse(
        body(),
        status_code=status,
        media_type=media_type,
        headers=headers,
    )
