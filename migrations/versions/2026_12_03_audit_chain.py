"""The audit log becomes a hash chain: sequence numbers, a reason, previous and own hash;
on PostgreSQL, triggers refuse UPDATE, DELETE and TRUNCATE of it.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03

Reviewed by hand. ``audit_events.subject`` is renamed ``target``. The rows already there
(worker suspensions and their lifting, refuted outputs) are chained in ``id`` order, with
an empty reason, by the serialisation of docs/governance.md ("Audit log"), written out
here rather than imported, so this migration keeps computing what it computed when the
service changes. On SQLite the columns are changed through ``batch_alter_table``
(the table is rebuilt); PostgreSQL gets plain ``ALTER TABLE`` statements. Downgrade
drops the triggers first, then the columns.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GENESIS = "0" * 64

_TRIGGER_FUNCTION = """
CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only: % is refused (docs/governance.md, "Audit log")',
        TG_OP;
END;
$$
"""
_TRIGGER = """
CREATE TRIGGER audit_events_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only()
"""


def _entry_hash(row: Any, seq: int, prev_hash: str) -> str:
    at: dt.datetime = row.at
    if at.tzinfo is None:  # SQLite hands back naive UTC values
        at = at.replace(tzinfo=dt.UTC)
    document = {
        "format": "agora.audit/1",
        "seq": seq,
        "at": at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "actor": row.actor,
        "action": row.action,
        "target": row.target,
        "reason": "",
        "detail": row.detail,
        "prev_hash": prev_hash,
    }
    text = json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _chain_existing_rows() -> None:
    events = sa.table(
        "audit_events",
        sa.column("id", sa.Integer()),
        sa.column("at", sa.DateTime(timezone=True)),
        sa.column("actor", sa.String()),
        sa.column("action", sa.String()),
        sa.column("target", sa.String()),
        sa.column("detail", sa.JSON()),
        sa.column("seq", sa.Integer()),
        sa.column("prev_hash", sa.String()),
        sa.column("hash", sa.String()),
    )
    connection = op.get_bind()
    rows = connection.execute(
        sa.select(
            events.c.id,
            events.c.at,
            events.c.actor,
            events.c.action,
            events.c.target,
            events.c.detail,
        ).order_by(events.c.id)
    ).all()
    prev_hash = GENESIS
    for seq, row in enumerate(rows, start=1):
        own = _entry_hash(row, seq, prev_hash)
        connection.execute(
            events.update()
            .where(events.c.id == row.id)
            .values(seq=seq, prev_hash=prev_hash, hash=own)
        )
        prev_hash = own


def upgrade() -> None:
    with op.batch_alter_table("audit_events") as batch:
        batch.alter_column(
            "subject",
            new_column_name="target",
            existing_type=sa.String(length=200),
            existing_nullable=False,
        )
        batch.add_column(sa.Column("seq", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("reason", sa.Text(), server_default="", nullable=False))
        batch.add_column(sa.Column("prev_hash", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("hash", sa.String(length=64), nullable=True))
    _chain_existing_rows()
    with op.batch_alter_table("audit_events") as batch:
        batch.alter_column("seq", existing_type=sa.Integer(), nullable=False)
        batch.alter_column("prev_hash", existing_type=sa.String(length=64), nullable=False)
        batch.alter_column("hash", existing_type=sa.String(length=64), nullable=False)
        batch.create_index(op.f("ix_audit_events_seq"), ["seq"], unique=True)
        batch.create_index(op.f("ix_audit_events_actor"), ["actor"], unique=False)
        batch.create_index(op.f("ix_audit_events_target"), ["target"], unique=False)
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_TRIGGER_FUNCTION)
        op.execute(_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER audit_events_append_only ON audit_events")
        op.execute("DROP FUNCTION audit_events_append_only()")
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_index(op.f("ix_audit_events_target"))
        batch.drop_index(op.f("ix_audit_events_actor"))
        batch.drop_index(op.f("ix_audit_events_seq"))
        batch.drop_column("hash")
        batch.drop_column("prev_hash")
        batch.drop_column("reason")
        batch.drop_column("seq")
        batch.alter_column(
            "target",
            new_column_name="subject",
            existing_type=sa.String(length=200),
            existing_nullable=False,
        )
