"""Monitoring: named, dated text sets, monitoring schedules and each expert's runs
(docs/governance.md, "Monitoring").

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03

Reviewed by hand. Three new tables; nothing existing changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "text_sets",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("date", sa.String(length=10), nullable=False),
        sa.Column("texts", sa.JSON(), nullable=False),
        sa.Column("n_texts", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("uploader", sa.String(length=100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_text_sets")),
        sa.UniqueConstraint("name", "date", name="uq_text_sets_name_date"),
    )
    op.create_index(op.f("ix_text_sets_name"), "text_sets", ["name"], unique=False)
    op.create_table(
        "monitor_schedules",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("every_hours", sa.Float(), nullable=True),
        sa.Column("text_sets", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.String(length=100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancelled_by", sa.String(length=100), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_monitor_schedules")),
    )
    op.create_table(
        "monitor_runs",
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("schedule_id", sa.Integer(), nullable=False),
        sa.Column("expert_id", sa.String(length=32), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("run_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reference_evaluation", sa.Integer(), nullable=True),
        sa.Column("own_bits_per_byte", sa.Float(), nullable=True),
        sa.Column("reference_bits_per_byte", sa.Float(), nullable=True),
        sa.Column("worsening", sa.Float(), nullable=True),
        sa.Column("repetition", sa.Float(), nullable=True),
        sa.Column("base_repetition", sa.Float(), nullable=True),
        sa.Column("report_id", sa.Integer(), nullable=True),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_monitor_runs_job_id_jobs")),
        sa.ForeignKeyConstraint(
            ["schedule_id"],
            ["monitor_schedules.id"],
            name=op.f("fk_monitor_runs_schedule_id_monitor_schedules"),
        ),
        sa.ForeignKeyConstraint(
            ["expert_id"], ["experts.id"], name=op.f("fk_monitor_runs_expert_id_experts")
        ),
        sa.ForeignKeyConstraint(
            ["report_id"],
            ["expert_reports.id"],
            name=op.f("fk_monitor_runs_report_id_expert_reports"),
        ),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_monitor_runs")),
    )
    for column in ("schedule_id", "expert_id", "report_id"):
        op.create_index(op.f(f"ix_monitor_runs_{column}"), "monitor_runs", [column], unique=False)


def downgrade() -> None:
    for column in ("report_id", "expert_id", "schedule_id"):
        op.drop_index(op.f(f"ix_monitor_runs_{column}"), table_name="monitor_runs")
    op.drop_table("monitor_runs")
    op.drop_table("monitor_schedules")
    op.drop_index(op.f("ix_text_sets_name"), table_name="text_sets")
    op.drop_table("text_sets")
