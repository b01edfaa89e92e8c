"""items.attempts_excused: attempts that do not count against max_attempts

Outage releases and retry_failed excuse attempts instead of resetting ``attempts``, so attempt
numbers never repeat for an item (the completion fence and lineage pin them).

Revision ID: 0006
Revises: 0005
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
    with op.batch_alter_table("items") as batch:
        batch.add_column(
            sa.Column("attempts_excused", sa.Integer(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("items") as batch:
        batch.drop_column("attempts_excused")
