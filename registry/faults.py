"""Crash points: where the crash-consistency tests kill the server, by name.

``crash_point("upload.after_blob_commit")`` does nothing unless the environment variable
``AGORA_CRASH_AT`` names that point; then the process sends itself SIGKILL there, the
way the OOM killer or a power cut would end it (no ``finally``, no lifespan shutdown, no
flush). ``AGORA_CRASH_AT=name,count`` passes the point ``count - 1`` times and crashes on
the ``count``-th. The variable is read at each call, so a test can set it on a server it
starts; a process where it is unset pays one dictionary lookup per point.

The points, in the order a write reaches them (registry/services/experts.py,
completion.py; docs/architecture.md, "Storage write order"):

* an expert upload: ``upload.after_staging``, ``upload.after_validation``,
  ``upload.after_blob_commit``, ``upload.in_row_transaction`` (rows flushed, not
  committed), ``upload.after_row_commit``;
* a job completion: ``complete.after_blob_commit``, ``complete.in_row_transaction``,
  ``complete.after_row_commit``.

tests/adversarial/test_crash_consistency.py kills the server at each of them and checks
with ``agora admin fsck`` that no row names missing or damaged bytes.
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "AGORA_CRASH_AT"

UPLOAD_POINTS = (
    "upload.after_staging",
    "upload.after_validation",
    "upload.after_blob_commit",
    "upload.in_row_transaction",
    "upload.after_row_commit",
)
COMPLETION_POINTS = (
    "complete.after_blob_commit",
    "complete.in_row_transaction",
    "complete.after_row_commit",
)
POINTS = UPLOAD_POINTS + COMPLETION_POINTS

_lock = threading.Lock()
_passes: dict[str, int] = {}


def parse(spec: str) -> tuple[str, int]:
    """``name[,count]`` -> (name, count >= 1); ValueError for anything else."""
    name, _, count = spec.strip().partition(",")
    name = name.strip()
    if name not in POINTS:
        raise ValueError(f"{ENV}: unknown crash point {name!r}; one of {', '.join(POINTS)}")
    n = int(count) if count.strip() else 1
    if n < 1:
        raise ValueError(f"{ENV}: the count must be at least 1, not {n}")
    return name, n


def crash_point(name: str) -> None:
    """SIGKILL this process here if ``AGORA_CRASH_AT`` names ``name`` (module docstring)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, count = parse(spec)
    if target != name:
        return
    with _lock:
        _passes[name] = _passes.get(name, 0) + 1
        reached = _passes[name] >= count
    if reached:
        os.kill(os.getpid(), signal.SIGKILL)
