"""tenant limits and weights; tenant_claims, the fair-share window

Why: one fleet serves many tenants. Each tenant may override the configured limits (open items,
submissions per minute, items per job, items running at once) and its fair-share weight; NULL
means "the configured default". ``tenant_claims`` records one row per claim statement (tenant,
the claimed job's size, when, how many items): the workers' scheduler reads the last seconds of
it to share claims by weight and to bound the fast lane; the reconciler prunes it.

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LIMITS = ("max_queued_items", "max_running_items", "submissions_per_minute", "max_items_per_job")


def upgrade() -> None:
    with op.batch_alter_table("tenants") as t:
        for name in LIMITS:
            t.add_column(sa.Column(name, sa.Integer(), nullable=True))
        t.add_column(sa.Column("weight", sa.Float(), nullable=True))
    op.create_table(
        "tenant_claims",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("tenant_id", sa.String(32), nullable=False),
        sa.Column("job_items", sa.Integer(), nullable=False),
        sa.Column("claimed_at", sa.DateTime(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
    )
    op.create_index("ix_tenant_claims_claimed_at", "tenant_claims", ["claimed_at"])


def downgrade() -> None:
    op.drop_index("ix_tenant_claims_claimed_at", table_name="tenant_claims")
    op.drop_table("tenant_claims")
    with op.batch_alter_table("tenants") as t:
        for name in (*LIMITS, "weight"):
            t.drop_column(name)
