"""Things a live process owns on disk, and finding the ones whose owner died.

Several processes may share a data directory: replicas of the server on one host, `agora
serve` next to `agora admin`. What one of them leaves behind when it is killed (staging
files of the uploads it was receiving, the token of its in-process worker) must be
cleaned up by the next one to start, without touching what a live process still uses.

Each owner holds a lock file ``<directory>/<name>.lock``, locked with ``flock(LOCK_EX)``
for as long as it lives. The kernel drops the lock when the process ends, however it ends
(SIGKILL, the OOM killer, a power cut), so any process can tell a dead owner from a live
one: it can take a dead owner's lock and never a live one's. ``flock`` locks belong to an
open file, not to a process, so a second claim from the same process is refused too.

A lock file is created under a temporary name, locked, then renamed into place: no other
process ever sees a ``.lock`` that is not locked by its owner. POSIX only (``fcntl``);
staging is a local directory (docs/registry-storage.md).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import weakref
from collections.abc import Callable
from pathlib import Path

LOCK_SUFFIX = ".lock"
_TMP_MARK = ".claiming-"


class OwnerLock:
    """This process's claim on ``name`` in ``directory``: held until :meth:`release`, the
    object is garbage-collected, or the process ends."""

    def __init__(self, directory: Path, name: str, fd: int) -> None:
        self.directory = directory
        self.name = name
        self.path = directory / f"{name}{LOCK_SUFFIX}"
        self._fd = fd
        # Closing the descriptor drops the lock: tests build many short-lived owners.
        self._close = weakref.finalize(self, os.close, fd)

    @classmethod
    def acquire(cls, directory: Path, *, prefix: str) -> OwnerLock:
        """A new claim named ``<prefix><random>``; ``directory`` is created if needed."""
        directory.mkdir(parents=True, exist_ok=True)
        name = f"{prefix}{secrets.token_hex(6)}"
        tmp = directory / f"{_TMP_MARK}{name}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.rename(tmp, directory / f"{name}{LOCK_SUFFIX}")
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return cls(directory, name, fd)

    def release(self) -> None:
        """Give the claim up: the lock file is removed, then unlocked."""
        if not self._close.alive:
            return
        self.path.unlink(missing_ok=True)
        self._close()


def _take_if_dead(path: Path) -> int | None:
    """An open, locked descriptor of ``path`` if its owner is gone; None if it is alive
    or the file went away (another process reaped it first)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    try:
        same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        same = False
    if not same:  # reaped and removed while we waited for the lock
        os.close(fd)
        return None
    return fd


def reap_dead(directory: Path, *, prefix: str, on_dead: Callable[[str], None]) -> list[str]:
    """For every claim ``<prefix>*`` in ``directory`` whose owner is gone: call
    ``on_dead(name)`` while holding its lock, then remove the lock file. Returns the names
    reaped. ``on_dead`` must be idempotent (a crash between it and the removal runs it
    again at the next start); if it raises, the claim stays for the next attempt."""
    if not directory.is_dir():
        return []
    reaped: list[str] = []
    for path in sorted(directory.iterdir()):
        name = path.name
        if name.startswith(_TMP_MARK + prefix):
            # A claim whose owner died between creating and renaming its lock file.
            fd = _take_if_dead(path)
            if fd is not None:
                path.unlink(missing_ok=True)
                os.close(fd)
            continue
        if not (name.startswith(prefix) and name.endswith(LOCK_SUFFIX)):
            continue
        fd = _take_if_dead(path)
        if fd is None:
            continue
        try:
            owner = name.removesuffix(LOCK_SUFFIX)
            on_dead(owner)
            path.unlink(missing_ok=True)
            reaped.append(owner)
        finally:
            os.close(fd)
    return reaped


def is_claimed(directory: Path, name: str) -> bool:
    """Whether a lock file for ``name`` exists (its owner may be alive or not)."""
    return (directory / f"{name}{LOCK_SUFFIX}").exists()
