"""Streaming multipart/form-data parsing straight into staging files.

The request body is fed chunk by chunk from ``request.stream()`` to python-multipart's
push parser; each file part is written to its own staging file while it is hashed, so
an upload is never held in memory and the digest the registry records is the one it
computed, never the client's.

Hashing and writing run in a worker thread, double-buffered: while one batch of about
``FLUSH_BYTES`` is hashed and written (sha256 and ``write`` release the GIL), the event
loop receives and parses the next. The single-threaded version was bounded by "receive +
parse + hash" on one core (docs/sdk.md, "Transfer benchmark"); memory stays at two
batches in flight.

A client that stops sending is cut off by the limits middleware (registry/api/limits.py):
its ``receive`` raises a 408 ``HTTPException`` when no body byte arrives in time, which
passes through here, and every staging file of the request is removed on the way out.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from functools import partial

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request

from registry.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from registry.services.staged import UploadedFile
from registry.storage import Staging, StagingFile

# 2 MiB batches: ~30 uvicorn-sized chunks per thread hop, and at most two batches (4 MiB)
# of request body held at once, whatever the upload's size.
FLUSH_BYTES = 2 << 20


@dataclass
class ParsedForm:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, UploadedFile] = field(default_factory=dict)
    _staged: list[StagingFile] = field(default_factory=list)

    def fingerprint(self) -> str:
        """sha256 over field values and file digests: equal for equal content, whatever the
        multipart boundary or part order a client used."""
        h = hashlib.sha256()
        for name in sorted(self.fields):
            h.update(f"field:{name}={self.fields[name]}\n".encode())
        for name in sorted(self.files):
            f = self.files[name]
            h.update(f"file:{name}={f.sha256}:{f.size}\n".encode())
        return h.hexdigest()

    def discard(self) -> None:
        """Remove every staging file still present (committed ones are already moved)."""
        for staged in self._staged:
            staged.discard()


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    is_file: bool = False
    header_field: bytearray = field(default_factory=bytearray)
    header_value: bytearray = field(default_factory=bytearray)
    headers: dict[str, bytes] = field(default_factory=dict)
    value: bytearray = field(default_factory=bytearray)
    staged: StagingFile | None = None
    size: int = 0


class _FormBuilder:
    def __init__(
        self,
        *,
        staging: Staging,
        file_limits: dict[str, int],
        field_names: set[str],
        field_limit: int,
    ) -> None:
        self.staging = staging
        self.file_limits = file_limits
        self.field_names = field_names
        self.field_limit = field_limit
        self.form = ParsedForm()
        self.part = _Part()
        self.ended = False
        self.seen: set[str] = set()
        # File work queued by the parser callbacks, run in order in a worker thread.
        self.ops: list[Callable[[], None]] = []
        self.pending_bytes = 0
        self.part_closed = False

    def take_ops(self) -> list[Callable[[], None]]:
        ops, self.ops = self.ops, []
        self.pending_bytes = 0
        self.part_closed = False
        return ops

    def should_flush(self) -> bool:
        return self.pending_bytes >= FLUSH_BYTES or self.part_closed

    # python-multipart callbacks: exceptions raised here propagate out of parser.write().
    def on_part_begin(self) -> None:
        self.part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.part.header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.part.header_value += data[start:end]

    def on_header_end(self) -> None:
        name = bytes(self.part.header_field).decode("latin-1").strip().lower()
        self.part.headers[name] = bytes(self.part.header_value)
        self.part.header_field.clear()
        self.part.header_value.clear()

    def on_headers_finished(self) -> None:
        disposition = self.part.headers.get("content-disposition")
        if disposition is None:
            raise BadRequest("a multipart part has no Content-Disposition", code="bad_multipart")
        _, options = parse_options_header(disposition)
        raw_name = options.get(b"name")
        if not raw_name:
            raise BadRequest("a multipart part has no field name", code="bad_multipart")
        name = raw_name.decode("utf-8", "replace")
        raw_filename = options.get(b"filename")
        self.part.name = name
        self.part.filename = raw_filename.decode("utf-8", "replace") if raw_filename else None
        if name in self.seen:
            raise BadRequest(f"field {name!r} appears more than once", code="duplicate_field")
        self.seen.add(name)
        if name in self.file_limits:
            self.part.is_file = True
            self.part.staged = self.staging.new_file()
            self.form._staged.append(self.part.staged)
        elif name not in self.field_names:
            known = sorted([*self.file_limits, *self.field_names])
            raise BadRequest(
                f"unexpected form field {name!r}; this endpoint takes {', '.join(known)}",
                code="unexpected_field",
            )

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.part
        if part.staged is not None:
            limit = self.file_limits[part.name]
            if part.size + (end - start) > limit:
                raise PayloadTooLarge(
                    f"file {part.name!r} exceeds the limit of {limit} bytes",
                    code="file_too_large",
                )
            part.size += end - start
            # A memoryview slice: no copy; it keeps the (immutable) chunk alive until written.
            self.ops.append(partial(part.staged.write, memoryview(data)[start:end]))
            self.pending_bytes += end - start
            return
        if len(part.value) + (end - start) > self.field_limit:
            raise PayloadTooLarge(
                f"form field {part.name!r} exceeds {self.field_limit} bytes",
                code="field_too_large",
            )
        part.value += data[start:end]

    def on_part_end(self) -> None:
        part = self.part
        if part.staged is not None:
            self.ops.append(partial(self._finish_file, part, part.staged))
            self.part_closed = True
        else:
            try:
                self.form.fields[part.name] = bytes(part.value).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadRequest(
                    f"form field {part.name!r} is not UTF-8", code="bad_multipart"
                ) from exc

    def on_end(self) -> None:
        self.ended = True

    def _finish_file(self, part: _Part, staged: StagingFile) -> None:
        """Runs in the worker thread, after every write of the part."""
        staged.close()
        self.form.files[part.name] = UploadedFile(
            field=part.name,
            filename=part.filename,
            path=staged.path,
            size=staged.size,
            sha256=staged.hexdigest(),
        )


def _run(ops: list[Callable[[], None]]) -> None:
    for op in ops:
        op()


async def parse_multipart(
    request: Request,
    *,
    staging: Staging,
    file_limits: dict[str, int],
    field_names: set[str],
    field_limit: int,
    required_files: Collection[str],
    required_fields: Collection[str] = (),
) -> ParsedForm:
    """Parse a multipart body into staging files and small text fields.

    On any failure every staging file is removed before the error propagates; on success
    the caller owns the files (``ParsedForm.discard`` in a ``finally``).
    """
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or not options.get(b"boundary"):
        raise UnsupportedMediaType(
            "this endpoint takes multipart/form-data", code="expected_multipart"
        )
    # Refuse early what cannot fit, before a byte is staged (the per-file limits still
    # apply while streaming: Content-Length may be absent when the body is chunked).
    declared = request.headers.get("content-length")
    overhead = 64 * 1024 + field_limit * max(len(field_names), 1)
    if declared and declared.isdigit() and int(declared) > sum(file_limits.values()) + overhead:
        raise PayloadTooLarge(
            f"request body of {declared} bytes exceeds the limits of this endpoint",
            code="request_too_large",
        )
    builder = _FormBuilder(
        staging=staging, file_limits=file_limits, field_names=field_names, field_limit=field_limit
    )
    parser = MultipartParser(
        options[b"boundary"],
        {  # type: ignore[arg-type]
            "on_part_begin": builder.on_part_begin,
            "on_part_data": builder.on_part_data,
            "on_part_end": builder.on_part_end,
            "on_header_field": builder.on_header_field,
            "on_header_value": builder.on_header_value,
            "on_header_end": builder.on_header_end,
            "on_headers_finished": builder.on_headers_finished,
            "on_end": builder.on_end,
        },
    )
    loop = asyncio.get_running_loop()
    in_flight: asyncio.Future[None] | None = None
    try:
        try:
            async for chunk in request.stream():
                if not chunk:
                    continue
                parser.write(chunk)
                if builder.should_flush():
                    if in_flight is not None:
                        await in_flight
                    in_flight = loop.run_in_executor(None, _run, builder.take_ops())
            if in_flight is not None:
                await in_flight
            in_flight = None
            if builder.ops:
                in_flight = loop.run_in_executor(None, _run, builder.take_ops())
                await in_flight
            in_flight = None
        except ClientDisconnect as exc:
            raise BadRequest("the client disconnected during the upload", code="aborted") from exc
        except (BadRequest, PayloadTooLarge, HTTPException):
            raise  # HTTPException: 408, the body stalled (registry/api/limits.py)
        except Exception as exc:  # python-multipart's own parse errors
            if isinstance(exc, ValueError) or type(exc).__module__.startswith("python_multipart"):
                raise BadRequest(f"malformed multipart body: {exc}", code="bad_multipart") from exc
            raise
        if not builder.ended:
            raise BadRequest("the multipart body ended early", code="bad_multipart")
        form = builder.form
        missing = sorted(
            [f for f in required_files if f not in form.files]
            + [f for f in required_fields if f not in form.fields]
        )
        if missing:
            raise BadRequest(
                f"missing form field(s): {', '.join(missing)}",
                code="missing_field",
                errors=[{"loc": ["body", m], "msg": "field required"} for m in missing],
            )
        return form
    except BaseException:
        if in_flight is not None and not in_flight.done():
            # The worker may still be writing: remove the files once it has finished.
            in_flight.add_done_callback(lambda _: builder.form.discard())
        else:
            builder.form.discard()
        raise
