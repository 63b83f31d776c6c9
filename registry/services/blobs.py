"""Blob rows: the database's record that a content-addressed object is committed."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from registry.db.models import Blob, utcnow
from registry.errors import NotFound


def record_blob(*, session: Session, digest: str, size: int, storage_key: str) -> None:
    """Insert the blob's row unless it exists (identical bytes are stored once).

    ON CONFLICT DO NOTHING, not select-then-insert: two concurrent uploads of the same
    bytes must both succeed rather than one failing on the primary key at commit.
    """
    values = {"digest": digest, "size": size, "storage_key": storage_key, "created_at": utcnow()}
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        pg_stmt = postgresql.insert(Blob).values(**values).on_conflict_do_nothing()
        session.execute(pg_stmt)
    elif dialect == "sqlite":
        lite_stmt = sqlite.insert(Blob).values(**values).on_conflict_do_nothing()
        session.execute(lite_stmt)
    elif session.get(Blob, digest) is None:
        session.add(Blob(**values))
        session.flush()


def get_blob(*, session: Session, digest: str) -> Blob:
    blob = session.scalars(select(Blob).where(Blob.digest == digest)).one_or_none()
    if blob is None:
        raise NotFound(f"no blob {digest}", code="blob_not_found")
    return blob
