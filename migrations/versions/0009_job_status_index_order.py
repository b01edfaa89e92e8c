"""items: the (job_id, status) index holds the item's index too

Why: the reconciler's stale-chunk scan asks, per chunk, for a queued item of the chunk's range.
Without statistics on a freshly loaded job (and whenever they say queued items are rare), the
planner answered that from ``ix_items_job_status`` and read every queued item of the job for each
chunk: 0.6 s per reconcile at 40,000 items, growing with the square of the job's size. With the
index appended, that probe reads only the chunk's own queued items, whichever index is chosen.
Counting a job's items by status (progress) still reads the index alone.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_items_job_status", table_name="items")
    op.create_index("ix_items_job_status", "items", ["job_id", "status", "index"])


def downgrade() -> None:
    op.drop_index("ix_items_job_status", table_name="items")
    op.create_index("ix_items_job_status", "items", ["job_id", "status"])
