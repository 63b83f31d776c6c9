"""Withdrawal by lineage: the ancestor that withdrew an expert, and the status it had;
reports of experts.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03

Written by hand. ``experts.withdrawn_cause`` names the disabled or withdrawn ancestor
that made an expert ``withdrawn_by_lineage``; ``experts.lineage_prior_status`` is the
status it goes back to once no ancestor withdraws it (docs/governance.md, "States").
``expert_reports`` holds reports and their resolution (docs/governance.md, "Reports").
``experts.status`` widens from 16 to 24 characters for ``withdrawn_by_lineage``. Columns
are changed through ``batch_alter_table`` (SQLite rebuilds the table).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("experts") as batch:
        batch.alter_column("status", existing_type=sa.String(length=16), type_=sa.String(length=24))
        batch.add_column(sa.Column("withdrawn_cause", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("lineage_prior_status", sa.String(length=24), nullable=True))
    op.create_table(
        "expert_reports",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("expert_id", sa.String(length=32), nullable=False),
        sa.Column("reporter", sa.String(length=100), nullable=False),
        sa.Column("reporter_token_id", sa.Integer(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("evidence", sa.Text(), server_default="", nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("resolution", sa.Text(), nullable=True),
        sa.Column("resolved_by", sa.String(length=100), nullable=True),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("moderation_action", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["expert_id"], ["experts.id"], name=op.f("fk_expert_reports_expert_id_experts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_expert_reports")),
    )
    for column in ("expert_id", "reporter", "status"):
        op.create_index(
            op.f(f"ix_expert_reports_{column}"), "expert_reports", [column], unique=False
        )


def downgrade() -> None:
    for column in ("expert_id", "reporter", "status"):
        op.drop_index(op.f(f"ix_expert_reports_{column}"), table_name="expert_reports")
    op.drop_table("expert_reports")
    with op.batch_alter_table("experts") as batch:
        batch.drop_column("lineage_prior_status")
        batch.drop_column("withdrawn_cause")
        batch.alter_column("status", existing_type=sa.String(length=24), type_=sa.String(length=16))
