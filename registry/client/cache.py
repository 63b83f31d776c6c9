"""The local, content-addressed download cache.

Layout under the cache directory (default ``$AGORA_CACHE_DIR``, else
``$XDG_CACHE_HOME/agora``, else ``~/.cache/agora``)::

    sha256/<hex>        a complete blob whose bytes hashed to <hex> when it was written
    sha256/<hex>.part   an interrupted download of <hex>; the next download resumes it
    sha256/<hex>.lock   held (flock) by whoever is fetching <hex> right now

Keying partial files by the expected digest means a resume only ever continues the same
content; the final rename happens only after the whole file hashed to the right digest.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from registry.client.errors import DigestMismatch

# 1 MiB reads: large enough that hashing runs at hashlib's speed, small enough to stay
# invisible in memory.
READ_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    env = os.environ.get("AGORA_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "agora"


def parse_digest(digest: str) -> str:
    """The lowercase hex of a ``sha256:<hex>`` (or bare hex) digest; ValueError otherwise."""
    algo, sep, hexdigest = digest.strip().partition(":")
    if not sep:
        algo, hexdigest = "sha256", algo
    hexdigest = hexdigest.lower()
    if algo.lower() != "sha256" or len(hexdigest) != 64:
        raise ValueError(f"not a sha256 digest: {digest!r}")
    int(hexdigest, 16)  # raises ValueError on non-hex characters
    return hexdigest


def sha256_file(path: Path, hasher: hashlib._Hash | None = None) -> hashlib._Hash:
    hasher = hasher or hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(READ_CHUNK):
            hasher.update(chunk)
    return hasher


class BlobCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def blob_path(self, hexdigest: str) -> Path:
        return self.root / "sha256" / hexdigest

    def part_path(self, hexdigest: str) -> Path:
        return self.root / "sha256" / f"{hexdigest}.part"

    @contextlib.contextmanager
    def locked(self, hexdigest: str) -> Iterator[None]:
        """Hold the cache entry ``hexdigest`` exclusively while it is being fetched.

        Several workers on one machine share a cache; without this, two downloads of the same
        blob would append to the same ``.part`` file. An advisory ``flock`` on a sidecar
        file (released by the kernel if the process dies); where ``fcntl`` does not exist
        (Windows) downloads are not serialised and a clash ends in a digest mismatch.
        """
        directory = self.root / "sha256"
        directory.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:
            yield
            return
        fd = os.open(directory / f"{hexdigest}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def lookup(self, hexdigest: str) -> Path | None:
        """The cached blob if present and its bytes still hash to ``hexdigest``.

        A cache entry that no longer matches (disk corruption, a user editing a hard-linked
        copy) is deleted so the caller fetches it again.
        """
        path = self.blob_path(hexdigest)
        if not path.is_file():
            return None
        if sha256_file(path).hexdigest() == hexdigest:
            return path
        path.unlink(missing_ok=True)
        return None

    def commit(self, part: Path, hexdigest: str) -> Path:
        final = self.blob_path(hexdigest)
        os.replace(part, final)
        return final


def place(source: Path, dest: Path, hexdigest: str | None = None) -> Path:
    """Put a copy of the cached ``source`` at ``dest`` atomically.

    A hard link costs nothing on the same filesystem; a copy is the fallback, written to a
    temporary file next to ``dest`` and, given ``hexdigest``, hashed as it is written and
    renamed into place only if it matches (``DigestMismatch`` otherwise, nothing left). The
    cache re-hashes its entries on every hit, so a later in-place edit of a linked ``dest``
    is caught rather than served.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        if os.path.samefile(source, dest):
            return dest  # already this very file (a hard link placed earlier)
    # A name of its own per call: processes sharing a cache (a worker, the user's SDK) may
    # place the same file at the same time.
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.agora-tmp")
    try:
        os.link(source, tmp)
    except OSError:
        try:
            _copy_verified(source, tmp, hexdigest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    try:
        os.replace(tmp, dest)
    finally:
        # POSIX rename() of one hard link onto another link of the same inode does nothing
        # and succeeds: when another caller linked ``dest`` to the same cache entry first,
        # ``tmp`` is still there. (After a real rename it is gone; the unlink is a no-op.)
        tmp.unlink(missing_ok=True)
    return dest


def _copy_verified(source: Path, tmp: Path, hexdigest: str | None) -> None:
    if hexdigest is None:
        shutil.copyfile(source, tmp)
        return
    hasher = hashlib.sha256()
    with source.open("rb") as src, tmp.open("wb") as out:
        while chunk := src.read(READ_CHUNK):
            out.write(chunk)
            hasher.update(chunk)
    if hasher.hexdigest() != hexdigest:
        raise DigestMismatch(
            f"the copy of {source.name} for {tmp.parent} hashes to sha256:"
            f"{hasher.hexdigest()}, not sha256:{hexdigest}; nothing was placed"
        )


class HashingWriter:
    """Appends chunks to a file and feeds them to a hasher on a background thread.

    Receiving (socket reads, HTTP parsing) stays on the caller's thread while writing and
    hashing, which both release the GIL, run beside it (what that gains is measured in
    docs/sdk.md, "Transfer benchmark"). Chunks travel in batches of about 1 MiB, at
    most ``max_batches`` queued, so memory stays bounded whatever the file size.
    ``close`` waits until every chunk handed over is on disk and hashed.
    """

    BATCH_BYTES = 1 << 20

    def __init__(self, path: Path, mode: str, hasher: hashlib._Hash, max_batches: int = 8):
        self._file = path.open(mode)
        self._hasher = hasher
        self._queue: queue.Queue[list[bytes] | None] = queue.Queue(maxsize=max_batches)
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="agora-writer", daemon=True)
        self._thread.start()

    def write(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._batch.append(chunk)
        self._batch_bytes += len(chunk)
        if self._batch_bytes >= self.BATCH_BYTES:
            self._queue.put(self._batch)
            self._batch, self._batch_bytes = [], 0

    def close(self) -> None:
        if self._batch:
            self._queue.put(self._batch)
            self._batch, self._batch_bytes = [], 0
        self._queue.put(None)
        self._thread.join()
        self._file.close()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> HashingWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self) -> None:
        while (batch := self._queue.get()) is not None:
            if self._error is not None:
                continue  # keep draining so the producer never blocks on a full queue
            try:
                for chunk in batch:
                    self._file.write(chunk)
                    self._hasher.update(chunk)
            except BaseException as exc:  # surfaced to the producer by write()/close()
                self._error = exc
