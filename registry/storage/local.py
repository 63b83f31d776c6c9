"""Blobs in a local directory: the embedded default (``<data_dir>/blobs``)."""

from __future__ import annotations

import datetime as dt
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from registry.errors import ServiceUnavailable
from registry.storage.base import (
    DEFAULT_CHUNK,
    BlobStore,
    StoredBlob,
    background_syncs,
    blob_key,
    digest_of_key,
)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalBlobStore(BlobStore):
    def __init__(self, root: Path, *, durable: bool = True) -> None:
        self.root = Path(root)
        # durable: fsync a blob and its directory before the metadata row can point at it,
        # so a power cut never leaves a committed row naming a truncated file.
        self.durable = durable
        self.location = str(self.root)

    def _path(self, key: str) -> Path:
        if digest_of_key(key) is None:
            raise ValueError(f"not a blob key: {key!r}")
        return self.root / key

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.root, prefix=".ready-")  # noqa: SIM115
            probe.close()
        except OSError as exc:
            raise ServiceUnavailable(
                f"blob directory {self.root} is not writable: {exc.strerror}",
                code="storage_unavailable",
            ) from exc

    def commit(self, path: Path, hexdigest: str) -> str:
        try:
            return self._commit(path, hexdigest)
        except OSError as exc:
            background_syncs.forget(path)
            path.unlink(missing_ok=True)
            raise ServiceUnavailable(
                f"blob directory {self.root} cannot store the blob: {exc.strerror or exc}",
                code="storage_unavailable",
            ) from exc

    def _commit(self, path: Path, hexdigest: str) -> str:
        key = blob_key(hexdigest)
        target = self._path(key)
        if target.exists():
            background_syncs.forget(path)
            path.unlink(missing_ok=True)
            # Refresh the age the garbage collector judges by: this blob may be an orphan
            # about to be collected, and a row is about to point at it.
            os.utime(target)
            return key
        target.parent.mkdir(parents=True, exist_ok=True)
        # The flush a staging file started when it closed, or one done here and now.
        if not background_syncs.wait(path) and self.durable:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        try:
            # Same filesystem: an atomic rename, no second copy of the bytes. A concurrent
            # commit of the same digest renames identical bytes over it, which is harmless.
            os.replace(path, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            # Staging on another filesystem: copy beside the target, then rename, so a
            # reader never sees a partial blob.
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            try:
                shutil.copyfile(path, tmp)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
        if self.durable:
            _fsync_dir(target.parent)
        return key

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def modified(self, key: str) -> dt.datetime:
        return dt.datetime.fromtimestamp(self._path(key).stat().st_mtime, dt.UTC)

    def iter_range(
        self, key: str, start: int = 0, stop: int | None = None, *, chunk_size: int = DEFAULT_CHUNK
    ) -> Iterator[bytes]:
        with open(self._path(key), "rb", buffering=0) as fh:
            end = os.fstat(fh.fileno()).st_size if stop is None else stop
            fh.seek(start)
            remaining = end - start
            while remaining > 0:
                chunk = fh.read(min(chunk_size, remaining))
                if not chunk:
                    return
                remaining -= len(chunk)
                yield chunk

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list_blobs(self) -> Iterator[StoredBlob]:
        base = self.root / "sha256"
        if not base.is_dir():
            return
        for fan in sorted(base.iterdir()):
            if not fan.is_dir():
                continue
            for blob in sorted(fan.iterdir()):
                key = f"sha256/{fan.name}/{blob.name}"
                if digest_of_key(key) is None:
                    continue
                try:
                    stat = blob.stat()
                except FileNotFoundError:
                    continue
                yield StoredBlob(
                    key, stat.st_size, dt.datetime.fromtimestamp(stat.st_mtime, dt.UTC)
                )
