"""The blob store interface and the local staging area every upload passes through.

Blobs are content-addressed: the key of a blob is ``sha256/ab/cdef...`` (its hex digest,
fanned out by the first two characters so no directory or listing page grows huge). The
digest is always computed by the server while it writes the staging file; a client's
claimed digest is never trusted.

Life of an upload::

    request body --stream--> StagingFile (local disk, hashed in the same pass)
                 --validate--> BlobStore.commit(path, digest)   (move / S3 multipart upload)
                 --then------> the metadata row is committed     (the database is the commit point)

A failure before ``commit`` leaves only a staging file, which the caller discards; a
failure after ``commit`` but before the row leaves an unreferenced blob, which the
garbage collector removes after its grace period. No row ever points at a missing blob.
"""

from __future__ import annotations

import abc
import datetime as dt
import hashlib
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, NamedTuple, Self

from registry.errors import ServiceUnavailable

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
KEY_PREFIX = "sha256/"
# 1 MiB reads keep per-chunk overhead (a syscall, a thread hop in the ASGI server) small
# next to the copy itself, while a download's buffer stays far below the RSS budget.
DEFAULT_CHUNK = 1 << 20


def blob_key(hexdigest: str) -> str:
    """The storage key of a blob: ``sha256/ab/cdef...``."""
    if not _HEX64.match(hexdigest):
        raise ValueError(f"not a sha256 hex digest: {hexdigest!r}")
    return f"{KEY_PREFIX}{hexdigest[:2]}/{hexdigest[2:]}"


def digest_of_key(key: str) -> str | None:
    """The hex digest a well-formed key names, or None for anything else in the store."""
    if not key.startswith(KEY_PREFIX):
        return None
    rest = key[len(KEY_PREFIX) :]
    fan, _, tail = rest.partition("/")
    digest = fan + tail
    if len(fan) != 2 or not _HEX64.match(digest):
        return None
    return digest


class StoredBlob(NamedTuple):
    key: str
    size: int
    modified: dt.datetime  # UTC


class BlobStore(abc.ABC):
    """Where committed blobs live. Implementations are safe to share between threads."""

    #: A short description for logs and the readiness check (never holds credentials).
    location: str

    @abc.abstractmethod
    def check(self) -> None:
        """Raise ``registry.errors.ServiceUnavailable`` if the store cannot be reached."""

    @abc.abstractmethod
    def commit(self, path: Path, hexdigest: str) -> str:
        """Store the finished staging file ``path`` under its content address.

        The staging file is consumed (moved or uploaded, then removed). Committing bytes
        that are already stored is a no-op apart from removing the staging file: identical
        bytes are kept once. Returns the key.
        """

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def size(self, key: str) -> int:
        """The blob's size in bytes; ``FileNotFoundError`` if it is absent."""

    @abc.abstractmethod
    def iter_range(
        self, key: str, start: int = 0, stop: int | None = None, *, chunk_size: int = DEFAULT_CHUNK
    ) -> Iterator[bytes]:
        """Yield the bytes ``[start, stop)`` of a blob (``stop=None``: to the end)."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove a blob; removing an absent blob is not an error."""

    @abc.abstractmethod
    def list_blobs(self) -> Iterator[StoredBlob]:
        """Every stored blob with its size and last-modified time, for the garbage collector.

        Sizes come from the listing itself (no request per object on S3).
        """

    def list_keys(self) -> Iterator[tuple[str, dt.datetime]]:
        """Every stored blob key with its last-modified time (UTC)."""
        for blob in self.list_blobs():
            yield blob.key, blob.modified

    def read_bytes(self, key: str) -> bytes:
        """A whole (small) blob; meant for config and datasheet files, not weights."""
        return b"".join(self.iter_range(key))


def _staging_unavailable(directory: Path, exc: OSError) -> ServiceUnavailable:
    return ServiceUnavailable(
        f"the staging area {directory} cannot take the upload: {exc.strerror or exc}",
        code="storage_unavailable",
    )


class _BackgroundSyncs:
    """fsyncs started when a staging file is closed, finished by the local store's commit.

    Flushing a large upload to disk takes a noticeable part of a second per GiB
    (docs/registry-storage.md, "Blobs"); started at close, it overlaps the validation
    pass that reads the file back, instead of adding to the upload's latency inside
    ``LocalBlobStore.commit``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[Path, tuple[threading.Thread, list[OSError]]] = {}

    def start(self, fd: int, path: Path) -> None:
        errors: list[OSError] = []

        def flush() -> None:
            try:
                os.fsync(fd)
            except OSError as exc:
                errors.append(exc)
            finally:
                os.close(fd)

        thread = threading.Thread(target=flush, name="agora-staging-fsync", daemon=True)
        with self._lock:
            self._pending[path] = (thread, errors)
        thread.start()

    def wait(self, path: Path) -> bool:
        """Wait for the flush of ``path``; False if none was started. Re-raises its error."""
        with self._lock:
            entry = self._pending.pop(path, None)
        if entry is None:
            return False
        thread, errors = entry
        thread.join()
        if errors:
            raise errors[0]
        return True

    def forget(self, path: Path) -> None:
        """Stop tracking ``path`` (discarded); its flush finishes on its own."""
        with self._lock:
            self._pending.pop(path, None)


background_syncs = _BackgroundSyncs()


class StagingFile:
    """A file being received: every write is hashed in the same pass, nothing is buffered.

    Use as a context manager or call :meth:`discard` on failure; after :meth:`close` the
    file is complete and ``hexdigest()``/``size`` describe it.
    """

    def __init__(self, fh: IO[bytes], path: Path, *, sync_on_close: bool = False) -> None:
        self._fh = fh
        self.path = path
        self.size = 0
        self._hash = hashlib.sha256()
        self._sync_on_close = sync_on_close

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._hash.update(data)
        try:
            self._fh.write(data)
        except OSError as exc:  # ENOSPC, EIO: the service's problem, not the client's
            raise _staging_unavailable(self.path.parent, exc) from exc
        self.size += len(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def close(self) -> None:
        if self._fh.closed:
            return
        if self._sync_on_close:
            background_syncs.start(os.dup(self._fh.fileno()), self.path)
        self._fh.close()

    def discard(self) -> None:
        self._sync_on_close = False
        self.close()
        background_syncs.forget(self.path)
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.discard()
        else:
            self.close()


class Staging:
    """The local directory uploads are written to before validation and commit.

    Staging is always a local filesystem, whatever the blob store: validators read the
    file by path, and the local store commits by an atomic rename from here.
    """

    PREFIX = "upload-"

    def __init__(self, directory: Path, *, sync_on_close: bool = False) -> None:
        self.directory = Path(directory)
        # Start flushing each finished file to disk in the background (for the local store,
        # which commits by renaming the very same file).
        self.sync_on_close = sync_on_close

    def new_file(self) -> StagingFile:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=self.PREFIX, dir=self.directory)
        except OSError as exc:
            raise _staging_unavailable(self.directory, exc) from exc
        # Unbuffered: callers write large chunks, and a Python-side buffer would only
        # add a copy of each one.
        return StagingFile(
            os.fdopen(fd, "wb", buffering=0), Path(name), sync_on_close=self.sync_on_close
        )

    def files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return [p for p in self.directory.iterdir() if p.name.startswith(self.PREFIX)]

    def sweep(self, *, older_than_seconds: float) -> list[Path]:
        """Remove staging files left behind by a crashed process; returns what was removed."""
        cutoff = time.time() - older_than_seconds
        removed = []
        for path in self.files():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed.append(path)
            except FileNotFoundError:
                continue
        return removed
