"""items: open items indexed in job order, retried items indexed apart

Why: a worker that has run out of its own chunk claims from the rest of the job (lingering), so
its claims range over the whole job; with only the (job_id, index) index behind them, each claim
walked past every finished item before the first claimable one, and the suspect check before it
walked the whole range: both grew with the job's size (about 3 ms each at 5,000 items, O(n) per
batch). ``ix_items_open`` now holds the index too, so a claim starts at the first open item, and
``ix_items_retried`` holds only items waiting for another attempt, so the suspect check is a
probe. Like the other partial indexes, a completion removes the item from both.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OPEN = "status IN ('queued', 'running')"
RETRIED = "status = 'queued' AND attempts > attempts_excused"


def upgrade() -> None:
    op.drop_index("ix_items_open", table_name="items")
    op.create_index("ix_items_open", "items", ["job_id", "index"],
                    postgresql_where=sa.text(OPEN), sqlite_where=sa.text(OPEN))
    op.create_index("ix_items_retried", "items", ["job_id", "index"],
                    postgresql_where=sa.text(RETRIED), sqlite_where=sa.text(RETRIED))


def downgrade() -> None:
    op.drop_index("ix_items_retried", table_name="items")
    op.drop_index("ix_items_open", table_name="items")
    op.create_index("ix_items_open", "items", ["job_id"],
                    postgresql_where=sa.text(OPEN), sqlite_where=sa.text(OPEN))
