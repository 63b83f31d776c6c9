"""Proof of forgetting: the reports a disable's evaluation jobs fill in.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03

Written by hand. ``forgetting_reports`` holds, per disable, one row per composition that
used the disabled expert and one for the expert alone: the ``evaluate`` job (purpose
``forgetting``) that measures it with the expert, without it and the base, its status and
numbers (docs/governance.md, "Proof of forgetting").
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "forgetting_reports",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("expert_id", sa.String(length=32), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("composition_id", sa.String(length=32), nullable=True),
        sa.Column("method", sa.String(length=16), nullable=False),
        sa.Column("without_method", sa.String(length=32), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("moderation_action", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("results", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["composition_id"],
            ["compositions.id"],
            name=op.f("fk_forgetting_reports_composition_id_compositions"),
        ),
        sa.ForeignKeyConstraint(
            ["expert_id"], ["experts.id"], name=op.f("fk_forgetting_reports_expert_id_experts")
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_forgetting_reports_job_id_jobs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_forgetting_reports")),
    )
    for column in ("expert_id", "job_id"):
        op.create_index(
            op.f(f"ix_forgetting_reports_{column}"), "forgetting_reports", [column], unique=False
        )


def downgrade() -> None:
    for column in ("expert_id", "job_id"):
        op.drop_index(op.f(f"ix_forgetting_reports_{column}"), table_name="forgetting_reports")
    op.drop_table("forgetting_reports")
