"""Jobs (leased by workers), their results, compositions, lineage and evaluations.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27

Reviewed by hand from autogenerate. ``job_results`` has the job id as its primary key: a
job is applied at most once, whatever its workers do.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("fencing_token", sa.BigInteger(), nullable=False),
        sa.Column("lease_owner", sa.String(length=200), nullable=True),
        sa.Column("lease_seconds", sa.Integer(), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("run_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("progress", sa.JSON(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("composition_id", sa.String(length=32), nullable=True),
        sa.Column("created_by", sa.String(length=100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_index(op.f("ix_jobs_composition_id"), "jobs", ["composition_id"], unique=False)
    op.create_index(op.f("ix_jobs_created_by"), "jobs", ["created_by"], unique=False)
    op.create_index(op.f("ix_jobs_kind"), "jobs", ["kind"], unique=False)
    op.create_index(op.f("ix_jobs_status_run_after"), "jobs", ["status", "run_after"], unique=False)

    op.create_table(
        "job_results",
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("fencing_token", sa.BigInteger(), nullable=False),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.Column("output_digest", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_job_results_job_id_jobs")),
        sa.ForeignKeyConstraint(
            ["output_digest"], ["blobs.digest"], name=op.f("fk_job_results_output_digest_blobs")
        ),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_job_results")),
    )
    op.create_table(
        "compositions",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("method", sa.String(length=16), nullable=False),
        sa.Column("base_revision", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("inputs", sa.JSON(), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=True),
        sa.Column("expert_id", sa.String(length=32), nullable=True),
        sa.Column("created_by", sa.String(length=100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["base_revision"],
            ["base_models.revision"],
            name=op.f("fk_compositions_base_revision_base_models"),
        ),
        sa.ForeignKeyConstraint(
            ["expert_id"], ["experts.id"], name=op.f("fk_compositions_expert_id_experts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_compositions")),
    )
    op.create_index(
        op.f("ix_compositions_created_by"), "compositions", ["created_by"], unique=False
    )

    op.create_table(
        "expert_parents",
        sa.Column("expert_id", sa.String(length=32), nullable=False),
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("parent_id", sa.String(length=32), nullable=False),
        sa.Column("parent_version", sa.Integer(), nullable=False),
        sa.Column("weight", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["expert_id"], ["experts.id"], name=op.f("fk_expert_parents_expert_id_experts")
        ),
        sa.ForeignKeyConstraint(
            ["parent_id"], ["experts.id"], name=op.f("fk_expert_parents_parent_id_experts")
        ),
        sa.PrimaryKeyConstraint(
            "expert_id", "version", "parent_id", name=op.f("pk_expert_parents")
        ),
    )
    op.create_index(
        op.f("ix_expert_parents_parent_id"), "expert_parents", ["parent_id"], unique=False
    )

    op.create_table(
        "composition_experts",
        sa.Column("composition_id", sa.String(length=32), nullable=False),
        sa.Column("position", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("expert_id", sa.String(length=32), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["composition_id"],
            ["compositions.id"],
            name=op.f("fk_composition_experts_composition_id_compositions"),
        ),
        sa.ForeignKeyConstraint(
            ["expert_id"], ["experts.id"], name=op.f("fk_composition_experts_expert_id_experts")
        ),
        sa.PrimaryKeyConstraint("composition_id", "position", name=op.f("pk_composition_experts")),
    )
    op.create_index(
        op.f("ix_composition_experts_expert_id"), "composition_experts", ["expert_id"], unique=False
    )

    op.create_table(
        "evaluations",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("expert_id", sa.String(length=32), nullable=True),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("composition_id", sa.String(length=32), nullable=True),
        sa.Column("text_set", sa.String(length=200), nullable=False),
        sa.Column("bits_per_byte", sa.Float(), nullable=False),
        sa.Column("base_bits_per_byte", sa.Float(), nullable=True),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_by", sa.String(length=100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["composition_id"],
            ["compositions.id"],
            name=op.f("fk_evaluations_composition_id_compositions"),
        ),
        sa.ForeignKeyConstraint(
            ["expert_id"], ["experts.id"], name=op.f("fk_evaluations_expert_id_experts")
        ),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_evaluations_job_id_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_evaluations")),
    )
    op.create_index(
        op.f("ix_evaluations_composition_id"), "evaluations", ["composition_id"], unique=False
    )
    op.create_index(op.f("ix_evaluations_expert_id"), "evaluations", ["expert_id"], unique=False)
    op.create_index(op.f("ix_evaluations_job_id"), "evaluations", ["job_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_evaluations_job_id"), table_name="evaluations")
    op.drop_index(op.f("ix_evaluations_expert_id"), table_name="evaluations")
    op.drop_index(op.f("ix_evaluations_composition_id"), table_name="evaluations")

    op.drop_table("evaluations")
    op.drop_index(op.f("ix_composition_experts_expert_id"), table_name="composition_experts")

    op.drop_table("composition_experts")
    op.drop_index(op.f("ix_expert_parents_parent_id"), table_name="expert_parents")

    op.drop_table("expert_parents")
    op.drop_index(op.f("ix_compositions_created_by"), table_name="compositions")

    op.drop_table("compositions")
    op.drop_table("job_results")
    op.drop_index(op.f("ix_jobs_status_run_after"), table_name="jobs")
    op.drop_index(op.f("ix_jobs_kind"), table_name="jobs")
    op.drop_index(op.f("ix_jobs_created_by"), table_name="jobs")
    op.drop_index(op.f("ix_jobs_composition_id"), table_name="jobs")

    op.drop_table("jobs")
