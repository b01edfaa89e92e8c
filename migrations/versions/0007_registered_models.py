"""registered_models: model versions a tenant trained with a finetune job

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "registered_models",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("base_model", sa.String(200), nullable=False),
        sa.Column("base_weights_sha256", sa.String(64), nullable=False),
        sa.Column("weights_key", sa.Text(), nullable=False),
        sa.Column("weights_sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("training_sha256", sa.String(64), nullable=False),
        sa.Column("training_rows", sa.Integer(), nullable=False),
        sa.Column("hyperparameters", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_registered_models"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"],
                                name="fk_registered_models_tenant_id_tenants"),
        sa.UniqueConstraint("tenant_id", "name", "version",
                            name="uq_registered_models_tenant_id_name_version"),
        sa.UniqueConstraint("job_id", name="uq_registered_models_job_id"),
    )
    op.create_index("ix_registered_models_tenant_id", "registered_models", ["tenant_id"])


def downgrade() -> None:
    op.drop_index("ix_registered_models_tenant_id", table_name="registered_models")
    op.drop_table("registered_models")
