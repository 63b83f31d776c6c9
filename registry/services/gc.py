"""Garbage collection of blobs nothing references any more.

The database is the commit point, so the collector works from it outward, in two phases
with a commit between them (it therefore runs its own transactions; call it with a
session that is not inside one):

1. ``blobs`` rows that no other row references (found by walking every foreign key to
   ``blobs.digest`` in the ORM metadata, so tables added later are covered without edits)
   and that are older than the grace period are deleted, and that deletion is committed.
2. Only then are store objects with no ``blobs`` row, older than the grace period, deleted.
   Deleting an object before its row's deletion is committed could leave a row pointing
   at a missing blob if that commit failed (e.g. an upload began referencing the row).
3. Staging files older than the grace period (left by a crashed upload) are removed.
4. On S3, multipart uploads begun before the grace period and never completed (S3 went
   away mid-upload, so not even the abort got through) are aborted, freeing their parts.

The grace period protects uploads in flight: a blob is committed to the store before its
row, and a re-upload of stored bytes refreshes the object's age (see ``BlobStore.commit``).
Phase 2 therefore judges each object twice: by the listing, then, just before deleting
it, by its rows read again and its age read again, so an upload of the same bytes that
refreshed it or recorded its row since the listing keeps it. (Only an upload refreshing
the object between that last look and the delete itself could still lose it: a window of
one stat, or one HEAD on S3, that ``agora admin fsck`` would report.)
"""

from __future__ import annotations

import dataclasses
import datetime as dt

from sqlalchemy import Column, ColumnElement, delete, exists, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from registry.db.models import Base, Blob
from registry.storage import BlobStore, Staging, digest_of_key
from registry.storage.s3 import S3BlobStore


@dataclasses.dataclass(frozen=True)
class GcReport:
    rows_deleted: int = 0
    objects_deleted: int = 0
    bytes_freed: int = 0
    staging_deleted: int = 0
    uploads_aborted: int = 0

    def __str__(self) -> str:
        text = (
            f"deleted {self.rows_deleted} unreferenced blob row(s), "
            f"{self.objects_deleted} stored object(s) ({self.bytes_freed} bytes), "
            f"{self.staging_deleted} stale staging file(s)"
        )
        if self.uploads_aborted:
            text += f"; aborted {self.uploads_aborted} incomplete S3 upload(s)"
        return text


def blob_references() -> list[Column[str]]:
    """Every column, in every table, that holds a foreign key to ``blobs.digest``."""
    digest_column = Blob.__table__.c.digest
    columns: list[Column[str]] = []
    for table in Base.metadata.sorted_tables:
        for fk in table.foreign_keys:
            if fk.column is digest_column:
                columns.append(fk.parent)
    return columns


# An upload that starts referencing a blob row in the same instant makes the delete fail
# its foreign key check; looking again a few times settles it (the row is then referenced).
_PHASE1_ATTEMPTS = 3


def _delete_unreferenced_rows(*, session: Session, unreferenced: ColumnElement[bool]) -> int:
    for attempt in range(_PHASE1_ATTEMPTS):
        try:
            with session.begin():
                # One statement: the references are checked when the rows are deleted, not
                # from a list read earlier.
                result = session.execute(delete(Blob).where(unreferenced))
                return int(getattr(result, "rowcount", 0) or 0)
        except IntegrityError:
            if attempt == _PHASE1_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def collect_garbage(
    *,
    session: Session,
    store: BlobStore,
    staging: Staging,
    grace: dt.timedelta,
    now: dt.datetime | None = None,
) -> GcReport:
    now = now or dt.datetime.now(dt.UTC)
    cutoff = now - grace

    # Phase 1: unreferenced rows, committed before any object goes.
    unreferenced = Blob.created_at < cutoff
    for column in blob_references():
        unreferenced = unreferenced & ~exists().where(column == Blob.digest)
    rows_deleted = _delete_unreferenced_rows(session=session, unreferenced=unreferenced)

    # Phase 2: objects no row names. Rows are read after phase 1 committed.
    with session.begin():
        known = set(session.scalars(select(Blob.digest)))
    candidates = [
        blob
        for blob in store.list_blobs()
        if blob.modified < cutoff
        and (digest := digest_of_key(blob.key)) is not None
        and digest not in known
    ]
    objects_deleted = 0
    bytes_freed = 0
    for blob in candidates:
        if not _still_collectable(session=session, store=store, key=blob.key, cutoff=cutoff):
            continue
        store.delete(blob.key)
        objects_deleted += 1
        bytes_freed += blob.size

    # Phase 3: staging files of uploads that died mid-way.
    staging_deleted = len(staging.sweep(older_than_seconds=grace.total_seconds()))

    # Phase 4: multipart uploads S3 never saw completed nor aborted.
    uploads_aborted = 0
    if isinstance(store, S3BlobStore):
        for upload in list(store.incomplete_uploads()):
            if upload.initiated < cutoff:
                store.abort_upload(upload)
                uploads_aborted += 1

    return GcReport(
        rows_deleted=rows_deleted,
        objects_deleted=objects_deleted,
        bytes_freed=bytes_freed,
        staging_deleted=staging_deleted,
        uploads_aborted=uploads_aborted,
    )


def _still_collectable(
    *, session: Session, store: BlobStore, key: str, cutoff: dt.datetime
) -> bool:
    """The object, looked at again just before it goes: still no row, still old."""
    with session.begin():
        if session.get(Blob, digest_of_key(key)) is not None:
            return False
    try:
        return store.modified(key) < cutoff
    except FileNotFoundError:
        return False
