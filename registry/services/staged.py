"""A staged upload as the write sequences see it: a file in the staging area with the size
and sha256 the registry computed while receiving it (registry/api/uploads.py), never the
client's. The route that parsed the request discards the staging files afterwards,
whatever happened; a committed file has already been moved into the blob store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class UploadedFile:
    field: str
    filename: str | None
    path: Path
    size: int
    sha256: str

    def read_bytes(self) -> bytes:
        return self.path.read_bytes()
