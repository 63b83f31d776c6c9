"""``agora admin fsck``: does every row's blob hold the bytes the row promises?

The database is the commit point and blobs are committed before the rows that name them
(docs/architecture.md, "Storage write order"), so a crash at any step may leave extra
bytes, never a row pointing at missing ones. This check verifies that promise and lists
what crashes legitimately leave behind:

* **damage** (makes the check fail): a ``blobs`` row whose object is missing, has another
  size than the row says, or whose bytes do not hash to the row's digest (read in
  chunks, never whole in memory). Each is listed with the rows that reference it
  (found by walking the foreign keys to ``blobs.digest``, as the garbage collector does);
* **orphans**: stored objects no ``blobs`` row names (an upload that died between its
  blob and its rows, or lost a race), with their age: ``agora admin gc`` deletes them
  once older than its grace period;
* **unreferenced rows**: ``blobs`` rows nothing references any more (gc deletes those too);
* **staging leftovers**: files of uploads whose process died while receiving them;
* **pending keys**: Idempotency-Key reservations of requests that never finished
  (registry/services/idempotency.py; they expire on their own).

It only reads: it changes nothing in the database, the store or the staging area. It runs
its own short transactions (call it with a session that is not inside one); the bytes are
read outside any transaction.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from typing import Any

from sqlalchemy import ColumnElement, exists, func, select, true
from sqlalchemy.orm import Session

from registry.db.models import Blob, IdempotencyKey
from registry.services.gc import blob_references
from registry.services.idempotency import PENDING
from registry.storage import BlobStore, Staging, blob_key, digest_of_key

MISSING = "missing"
SIZE_MISMATCH = "size_mismatch"
DIGEST_MISMATCH = "digest_mismatch"
BAD_KEY = "bad_storage_key"


@dataclasses.dataclass(frozen=True)
class DamagedBlob:
    """A blob row whose bytes are not what it promises."""

    digest: str
    storage_key: str
    problem: str  # MISSING, SIZE_MISMATCH, DIGEST_MISMATCH or BAD_KEY
    size: int  # what the row says
    actual_size: int | None  # what the store holds (None when missing)
    actual_digest: str | None  # what the stored bytes hash to (when the size matched)
    referenced_by: dict[str, int]  # "table.column" -> rows naming the blob


@dataclasses.dataclass(frozen=True)
class _Row:
    """What a ``blobs`` row promises (plain values: read in a transaction, used after it)."""

    digest: str
    size: int
    storage_key: str


@dataclasses.dataclass(frozen=True)
class Leftover:
    """Something a crash or a lost race leaves behind, and how old it is."""

    name: str  # an object key, a digest, a staging path or an Idempotency-Key
    size: int
    age_seconds: float


@dataclasses.dataclass(frozen=True)
class FsckReport:
    blobs_checked: int
    bytes_checked: int
    damaged: list[DamagedBlob]
    orphans: list[Leftover]
    unreferenced_rows: list[Leftover]
    staging: list[Leftover]
    pending_keys: list[Leftover]

    @property
    def clean(self) -> bool:
        """No row names missing or damaged bytes (leftovers are not damage)."""
        return not self.damaged

    def to_json(self) -> dict[str, Any]:
        return {"clean": self.clean, **dataclasses.asdict(self)}

    def __str__(self) -> str:
        lines = [
            f"checked {self.blobs_checked} blob(s), {self.bytes_checked} bytes: "
            + ("no damage" if self.clean else f"{len(self.damaged)} DAMAGED"),
        ]
        for bad in self.damaged:
            refs = ", ".join(f"{name} x{n}" for name, n in sorted(bad.referenced_by.items()))
            found = "" if bad.actual_size is None else f" (holds {bad.actual_size} bytes"
            if bad.actual_digest is not None:
                found += f", sha256 {bad.actual_digest}"
            found += ")" if found else ""
            lines.append(
                f"  {bad.problem}: sha256:{bad.digest} at {bad.storage_key}, "
                f"{bad.size} bytes{found}; referenced by {refs or 'nothing'}"
            )
        for title, items in (
            ("orphan object(s), no row names them (agora admin gc)", self.orphans),
            ("unreferenced blob row(s) (agora admin gc)", self.unreferenced_rows),
            ("staging leftover(s)", self.staging),
            ("pending Idempotency-Key reservation(s)", self.pending_keys),
        ):
            lines.append(f"{len(items)} {title}")
            lines.extend(
                f"  {item.name}  {item.size} bytes  {_age(item.age_seconds)} old" for item in items
            )
        return "\n".join(lines)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _references(session: Session) -> dict[str, dict[str, int]]:
    """digest -> {"table.column": number of rows naming it}."""
    refs: dict[str, dict[str, int]] = {}
    for column in blob_references():
        name = f"{column.table.name}.{column.name}"
        rows = session.execute(
            select(column, func.count()).where(column.is_not(None)).group_by(column)
        )
        for digest, count in rows:
            refs.setdefault(str(digest), {})[name] = int(count)
    return refs


def _unreferenced() -> ColumnElement[bool]:
    condition: ColumnElement[bool] = true()
    for column in blob_references():
        condition = condition & ~exists().where(column == Blob.digest)
    return condition


def _still_rows(session: Session, digests: set[str]) -> set[str]:
    """Which of ``digests`` have a ``blobs`` row now."""
    if not digests:
        return set()
    with session.begin():
        return set(session.scalars(select(Blob.digest).where(Blob.digest.in_(sorted(digests)))))


def _check_bytes(
    store: BlobStore, blob: _Row, refs: dict[str, int]
) -> tuple[DamagedBlob | None, int]:
    """The blob's damage (None if sound) and how many bytes were read."""

    def damaged(problem: str, size: int | None = None, digest: str | None = None) -> DamagedBlob:
        return DamagedBlob(blob.digest, blob.storage_key, problem, blob.size, size, digest, refs)

    if digest_of_key(blob.storage_key) is None or blob.storage_key != blob_key(blob.digest):
        return damaged(BAD_KEY), 0
    try:
        size = store.size(blob.storage_key)
    except FileNotFoundError:
        return damaged(MISSING), 0
    if size != blob.size:
        return damaged(SIZE_MISMATCH, size), 0
    sha = hashlib.sha256()
    read = 0
    try:
        for chunk in store.iter_range(blob.storage_key):
            sha.update(chunk)
            read += len(chunk)
    except FileNotFoundError:
        # Deleted between the size and the read.
        return damaged(MISSING), read
    if read != blob.size:
        return damaged(SIZE_MISMATCH, read), read
    if sha.hexdigest() != blob.digest:
        return damaged(DIGEST_MISMATCH, read, sha.hexdigest()), read
    return None, read


def check_storage(
    *,
    session: Session,
    store: BlobStore,
    staging: Staging,
    now: dt.datetime | None = None,
) -> FsckReport:
    """Verify every blob row against the store and list the leftovers (module docstring)."""
    now = now or dt.datetime.now(dt.UTC)
    with session.begin():
        blobs = [
            _Row(digest, size, key)
            for digest, size, key in session.execute(
                select(Blob.digest, Blob.size, Blob.storage_key).order_by(Blob.digest)
            )
        ]
        refs = _references(session)
        unreferenced_rows = [
            Leftover(row.digest, row.size, (now - row.created_at).total_seconds())
            for row in session.scalars(select(Blob).where(_unreferenced()).order_by(Blob.digest))
        ]
        pending = [
            Leftover(f"token #{row.token_id}: {row.key}", 0, (now - row.created_at).total_seconds())
            for row in session.scalars(
                select(IdempotencyKey)
                .where(IdempotencyKey.status_code == PENDING)
                .order_by(IdempotencyKey.created_at)
            )
        ]

    damaged: list[DamagedBlob] = []
    bytes_checked = 0
    for blob in blobs:
        bad, read = _check_bytes(store, blob, refs.get(blob.digest, {}))
        bytes_checked += read
        if bad is not None:
            damaged.append(bad)
    # A row the garbage collector deleted (with its object) while this ran is not damage.
    kept = _still_rows(session, {bad.digest for bad in damaged})
    damaged = [bad for bad in damaged if bad.digest in kept]

    known = {blob.digest for blob in blobs}
    candidates = [obj for obj in store.list_blobs() if digest_of_key(obj.key) not in known]
    # An upload that committed its blob and then its row while this ran left no orphan.
    named = _still_rows(session, {str(digest_of_key(obj.key)) for obj in candidates})
    orphans = [
        Leftover(obj.key, obj.size, (now - obj.modified).total_seconds())
        for obj in candidates
        if digest_of_key(obj.key) not in named
    ]

    leftovers = []
    for path in sorted(staging.files()):
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        age = now.timestamp() - stat.st_mtime
        leftovers.append(Leftover(str(path), stat.st_size, age))

    return FsckReport(
        blobs_checked=len(blobs),
        bytes_checked=bytes_checked,
        damaged=damaged,
        orphans=orphans,
        unreferenced_rows=unreferenced_rows,
        staging=leftovers,
        pending_keys=pending,
    )
