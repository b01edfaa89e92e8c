"""result cache: jobs.use_cache, outputs.cache_key (indexed) and outputs.cached_from

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 05:05:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("use_cache", sa.Boolean(), server_default=sa.true(),
                                   nullable=False))
    with op.batch_alter_table("outputs") as batch:
        batch.add_column(sa.Column("cache_key", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("cached_from", sa.BigInteger(), nullable=True))
        batch.create_index("ix_outputs_cache_key", ["cache_key"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("outputs") as batch:
        batch.drop_index("ix_outputs_cache_key")
        batch.drop_column("cached_from")
        batch.drop_column("cache_key")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("use_cache")
