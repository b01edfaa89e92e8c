"""outputs: ``details``, what a backend says about one output beyond the model's name

Why: models brought by users report per-output facts that lineage must keep: the instruction a
prompt template became for this row, why generation stopped (``finish_reason: length``), and for
a remote endpoint (``openai:``) which endpoint and which served model id answered, with
``weights_verified: false`` (Loom cannot hash weights it does not hold). Nullable JSON: rows of
the built-in model carry none, and no existing row changes.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("outputs", sa.Column("details", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outputs") as batch:
        batch.drop_column("details")
