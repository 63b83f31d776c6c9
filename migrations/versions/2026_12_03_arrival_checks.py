"""Checks on arrival: each arriving expert version's evaluation and its outcome.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03

Written by hand. ``arrival_checks`` holds, per expert version submitted while
``arrival_checks`` is on, the ``evaluate`` job that measures it on its own datasheet
samples against the base, the numbers, the threshold it was held to, and the outcome;
a flag names its report (docs/governance.md, "Checks on arrival").
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "arrival_checks",
        sa.Column("expert_id", sa.String(length=32), nullable=False),
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("min_gain", sa.Float(), nullable=False),
        sa.Column("bits_per_byte", sa.Float(), nullable=True),
        sa.Column("base_bits_per_byte", sa.Float(), nullable=True),
        sa.Column("relative_change", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("report_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["expert_id"], ["experts.id"], name=op.f("fk_arrival_checks_expert_id_experts")
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_arrival_checks_job_id_jobs")
        ),
        sa.ForeignKeyConstraint(
            ["report_id"],
            ["expert_reports.id"],
            name=op.f("fk_arrival_checks_report_id_expert_reports"),
        ),
        sa.PrimaryKeyConstraint("expert_id", "version", name=op.f("pk_arrival_checks")),
    )
    op.create_index(op.f("ix_arrival_checks_job_id"), "arrival_checks", ["job_id"], unique=False)
    op.create_index(
        op.f("ix_arrival_checks_report_id"), "arrival_checks", ["report_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_arrival_checks_report_id"), table_name="arrival_checks")
    op.drop_index(op.f("ix_arrival_checks_job_id"), table_name="arrival_checks")
    op.drop_table("arrival_checks")
