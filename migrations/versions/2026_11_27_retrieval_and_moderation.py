"""Retrieval vectors, the retrieval change counter, and moderation actions.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27

Reviewed by hand from autogenerate. ``retrieval_state`` starts with its single row at 0;
the code also tolerates the row missing (it upserts), so an emptied table is harmless.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    op.create_table(
        "expert_vectors",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("expert_id", sa.String(length=32), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("embedder", sa.String(length=100), nullable=False),
        sa.Column("ordinal", sa.Integer(), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        _ts("created_at"),
        sa.ForeignKeyConstraint(
            ["expert_id"], ["experts.id"], name=op.f("fk_expert_vectors_expert_id_experts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_expert_vectors")),
        sa.UniqueConstraint(
            "expert_id", "embedder", "ordinal", name=op.f("uq_expert_vectors_expert_id")
        ),
    )
    op.create_index(
        op.f("ix_expert_vectors_embedder"), "expert_vectors", ["embedder"], unique=False
    )
    state = op.create_table(
        "retrieval_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_retrieval_state")),
    )
    op.bulk_insert(state, [{"id": 1, "version": 0}])
    op.create_table(
        "retrieval_changes",
        sa.Column("version", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("expert_id", sa.String(length=32), nullable=False),
        _ts("at"),
        sa.ForeignKeyConstraint(
            ["expert_id"], ["experts.id"], name=op.f("fk_retrieval_changes_expert_id_experts")
        ),
        sa.PrimaryKeyConstraint("version", name=op.f("pk_retrieval_changes")),
    )
    op.create_index(
        op.f("ix_retrieval_changes_expert_id"), "retrieval_changes", ["expert_id"], unique=False
    )
    op.create_table(
        "moderation_actions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("expert_id", sa.String(length=32), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("actor", sa.String(length=100), nullable=False),
        _ts("at"),
        sa.ForeignKeyConstraint(
            ["expert_id"], ["experts.id"], name=op.f("fk_moderation_actions_expert_id_experts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_moderation_actions")),
    )
    op.create_index(
        op.f("ix_moderation_actions_expert_id"), "moderation_actions", ["expert_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_moderation_actions_expert_id"), table_name="moderation_actions")
    op.drop_table("moderation_actions")
    op.drop_index(op.f("ix_retrieval_changes_expert_id"), table_name="retrieval_changes")
    op.drop_table("retrieval_changes")
    op.drop_table("retrieval_state")
    op.drop_index(op.f("ix_expert_vectors_embedder"), table_name="expert_vectors")
    op.drop_table("expert_vectors")
