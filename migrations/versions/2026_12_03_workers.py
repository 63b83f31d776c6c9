"""Workers: the token holding a lease, trusted and suspended tokens, and an audit log.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03

Reviewed by hand from autogenerate. Columns are added through ``batch_alter_table`` so
that SQLite (which cannot add a foreign key to an existing table) rebuilds the tables;
PostgreSQL gets plain ``ALTER TABLE`` statements. ``audit_events`` is append-only.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tokens") as batch:
        batch.add_column(
            sa.Column("trusted", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch.add_column(sa.Column("suspended_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("suspension_reason", sa.Text(), nullable=True))
        batch.add_column(
            sa.Column("refusals", sa.Integer(), server_default=sa.text("0"), nullable=False)
        )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("lease_token_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("exclude_token_id", sa.Integer(), nullable=True))
        batch.create_foreign_key(
            op.f("fk_jobs_lease_token_id_tokens"), "tokens", ["lease_token_id"], ["id"]
        )
        batch.create_foreign_key(
            op.f("fk_jobs_exclude_token_id_tokens"), "tokens", ["exclude_token_id"], ["id"]
        )
    with op.batch_alter_table("job_results") as batch:
        batch.add_column(sa.Column("token_id", sa.Integer(), nullable=True))
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=100), nullable=False),
        sa.Column("action", sa.String(length=40), nullable=False),
        sa.Column("subject", sa.String(length=200), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
    )
    op.create_index(op.f("ix_audit_events_action"), "audit_events", ["action"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_audit_events_action"), table_name="audit_events")
    op.drop_table("audit_events")
    with op.batch_alter_table("job_results") as batch:
        batch.drop_column("token_id")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("fk_jobs_exclude_token_id_tokens"), type_="foreignkey")
        batch.drop_constraint(op.f("fk_jobs_lease_token_id_tokens"), type_="foreignkey")
        batch.drop_column("exclude_token_id")
        batch.drop_column("lease_token_id")
    with op.batch_alter_table("tokens") as batch:
        batch.drop_column("refusals")
        batch.drop_column("suspension_reason")
        batch.drop_column("suspended_at")
        batch.drop_column("trusted")
