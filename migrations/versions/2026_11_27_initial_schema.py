"""Initial schema: tokens, blobs, base models, experts, expert versions, idempotency keys.

Revision ID: 0001
Revises:
Create Date: 2026-11-27

Reviewed by hand from autogenerate. Timestamps are plain ``DateTime(timezone=True)`` here
so the migration does not depend on the ORM's type decorator, which may change later.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("storage_key", sa.String(length=200), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("digest", name=op.f("pk_blobs")),
    )
    op.create_table(
        "tokens",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("role", sa.String(length=20), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        _ts("created_at"),
        _ts("revoked_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_tokens_token_hash")),
    )
    op.create_index(op.f("ix_tokens_name"), "tokens", ["name"], unique=False)
    op.create_table(
        "base_models",
        sa.Column("revision", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("config_digest", sa.String(length=64), nullable=False),
        sa.Column("tokenizer_digest", sa.String(length=64), nullable=False),
        sa.Column("weights_digest", sa.String(length=64), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.String(length=100), nullable=False),
        _ts("created_at"),
        sa.ForeignKeyConstraint(
            ["config_digest"], ["blobs.digest"], name=op.f("fk_base_models_config_digest_blobs")
        ),
        sa.ForeignKeyConstraint(
            ["tokenizer_digest"],
            ["blobs.digest"],
            name=op.f("fk_base_models_tokenizer_digest_blobs"),
        ),
        sa.ForeignKeyConstraint(
            ["weights_digest"], ["blobs.digest"], name=op.f("fk_base_models_weights_digest_blobs")
        ),
        sa.PrimaryKeyConstraint("revision", name=op.f("pk_base_models")),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("token_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("method", sa.String(length=10), nullable=False),
        sa.Column("path", sa.String(length=500), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("response_body", sa.JSON(), nullable=False),
        _ts("created_at"),
        sa.ForeignKeyConstraint(
            ["token_id"], ["tokens.id"], name=op.f("fk_idempotency_keys_token_id_tokens")
        ),
        sa.PrimaryKeyConstraint("token_id", "key", name=op.f("pk_idempotency_keys")),
    )
    op.create_table(
        "experts",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("domain", sa.Text(), nullable=False),
        sa.Column("license", sa.String(length=200), nullable=False),
        sa.Column("language", sa.String(length=200), nullable=False),
        sa.Column("owner", sa.String(length=100), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("base_revision", sa.String(length=64), nullable=False),
        sa.Column("latest_version", sa.Integer(), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        sa.ForeignKeyConstraint(
            ["base_revision"],
            ["base_models.revision"],
            name=op.f("fk_experts_base_revision_base_models"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_experts")),
    )
    op.create_index(op.f("ix_experts_base_revision"), "experts", ["base_revision"], unique=False)
    op.create_index(op.f("ix_experts_owner"), "experts", ["owner"], unique=False)
    op.create_index(op.f("ix_experts_status"), "experts", ["status"], unique=False)
    op.create_table(
        "expert_versions",
        sa.Column("expert_id", sa.String(length=32), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("base_revision", sa.String(length=64), nullable=False),
        sa.Column("layers", sa.JSON(), nullable=False),
        sa.Column("n_modules", sa.Integer(), nullable=False),
        sa.Column("dtype", sa.String(length=16), nullable=False),
        sa.Column("datasheet", sa.Text(), nullable=False),
        sa.Column("datasheet_digest", sa.String(length=64), nullable=False),
        sa.Column("created_by", sa.String(length=100), nullable=False),
        _ts("created_at"),
        sa.ForeignKeyConstraint(
            ["base_revision"],
            ["base_models.revision"],
            name=op.f("fk_expert_versions_base_revision_base_models"),
        ),
        sa.ForeignKeyConstraint(
            ["digest"], ["blobs.digest"], name=op.f("fk_expert_versions_digest_blobs")
        ),
        sa.ForeignKeyConstraint(
            ["expert_id"], ["experts.id"], name=op.f("fk_expert_versions_expert_id_experts")
        ),
        sa.PrimaryKeyConstraint("expert_id", "version", name=op.f("pk_expert_versions")),
    )
    op.create_index(op.f("ix_expert_versions_digest"), "expert_versions", ["digest"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_expert_versions_digest"), table_name="expert_versions")
    op.drop_table("expert_versions")
    op.drop_index(op.f("ix_experts_status"), table_name="experts")
    op.drop_index(op.f("ix_experts_owner"), table_name="experts")
    op.drop_index(op.f("ix_experts_base_revision"), table_name="experts")
    op.drop_table("experts")
    op.drop_table("idempotency_keys")
    op.drop_table("base_models")
    op.drop_index(op.f("ix_tokens_name"), table_name="tokens")
    op.drop_table("tokens")
    op.drop_table("blobs")
