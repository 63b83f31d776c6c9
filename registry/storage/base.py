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
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, NamedTuple, Self

from registry.errors import ServiceUnavailable
from registry.storage.owners import OwnerLock, is_claimed, reap_dead

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

    def modified(self, key: str) -> dt.datetime:
        """The blob's last-modified time (UTC), the age the garbage collector judges by;
        ``FileNotFoundError`` if it is absent. (Stores override this listing scan.)"""
        for blob in self.list_blobs():
            if blob.key == key:
                return blob.modified
        raise FileNotFoundError(key)

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

    def __init__(
        self,
        fh: IO[bytes],
        path: Path,
        *,
        sync_on_close: bool = False,
        claim: OwnerLock | None = None,
    ) -> None:
        self._fh = fh
        self.path = path
        # The claim on the directory holding the file lives at least as long as the file.
        self._claim = claim
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

    Each process writes into a directory of its own, ``<root>/proc-<random>/``, claimed
    with a lock file beside it (``registry.storage.owners``) on its first upload. At start
    (``remove_dead``) a server removes the directories of processes that are gone: the
    staging files of uploads killed mid-way, which no request will ever finish, while the
    directories of live processes sharing the root are left alone. What survives anyway
    (files directly under the root, from before this layout) ``sweep`` removes after the
    garbage collector's grace period.
    """

    PREFIX = "upload-"
    OWNER_PREFIX = "proc-"

    def __init__(self, root: Path, *, sync_on_close: bool = False) -> None:
        self.root = Path(root)
        # Start flushing each finished file to disk in the background (for the local store,
        # which commits by renaming the very same file).
        self.sync_on_close = sync_on_close
        self._owner: OwnerLock | None = None
        self._owner_lock = threading.Lock()

    @property
    def directory(self) -> Path:
        """This process's own staging directory, created and claimed on first use."""
        with self._owner_lock:
            if self._owner is None:
                owner = OwnerLock.acquire(self.root, prefix=self.OWNER_PREFIX)
                try:
                    (self.root / owner.name).mkdir()
                except BaseException:
                    owner.release()
                    raise
                self._owner = owner
            return self.root / self._owner.name

    def open(self) -> list[Path]:
        """At start: make sure the root is writable, and remove the staging files of
        processes that are gone (``remove_dead``); returns those files."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _staging_unavailable(self.root, exc) from exc
        return self.remove_dead()

    def close(self) -> None:
        """Remove this process's directory (no upload is in flight any more: the server
        has stopped taking requests) and give up its claim."""
        with self._owner_lock:
            owner, self._owner = self._owner, None
        if owner is not None:
            shutil.rmtree(self.root / owner.name, ignore_errors=True)
            owner.release()

    def remove_dead(self) -> list[Path]:
        """Remove the directories, and the staging files in them, of every process that
        claimed one and is gone. Safe while other live processes share the root."""
        removed: list[Path] = []

        def remove(name: str) -> None:
            directory = self.root / name
            if directory.is_dir():
                removed.extend(p for p in directory.iterdir() if p.name.startswith(self.PREFIX))
                shutil.rmtree(directory, ignore_errors=True)

        if not self.root.is_dir():
            return removed
        reap_dead(self.root, prefix=self.OWNER_PREFIX, on_dead=remove)
        # A directory whose lock file is gone has no owner either (a claim is created before
        # its directory and removed after it).
        for directory in self.root.glob(f"{self.OWNER_PREFIX}*"):
            if directory.is_dir() and not is_claimed(self.root, directory.name):
                remove(directory.name)
        return removed

    def new_file(self) -> StagingFile:
        try:
            directory = self.directory
            fd, name = tempfile.mkstemp(prefix=self.PREFIX, dir=directory)
        except OSError as exc:
            raise _staging_unavailable(self.root, exc) from exc
        # Unbuffered: callers write large chunks, and a Python-side buffer would only
        # add a copy of each one.
        return StagingFile(
            os.fdopen(fd, "wb", buffering=0),
            Path(name),
            sync_on_close=self.sync_on_close,
            claim=self._owner,
        )

    def files(self) -> list[Path]:
        """Every staging file under the root: this process's, other processes', and any
        left directly in the root by an older layout."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            if entry.name.startswith(self.PREFIX) and entry.is_file():
                found.append(entry)
            elif entry.name.startswith(self.OWNER_PREFIX) and entry.is_dir():
                found.extend(p for p in entry.iterdir() if p.name.startswith(self.PREFIX))
        return found

    def sweep(self, *, older_than_seconds: float) -> list[Path]:
        """Remove staging files older than the grace period, whoever wrote them (uploads
        that died mid-way and were not removed at a start); returns what was removed."""
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
