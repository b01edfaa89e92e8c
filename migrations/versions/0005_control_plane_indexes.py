"""control plane: partial indexes for open items and running leases; no FK from items, events
and outputs to jobs

Why: on PostgreSQL every claim and completion inserted event (and output) rows whose foreign key
to jobs took a KEY SHARE lock on the single job row, so all workers of a job contended on it;
and submitting a job checked the items' foreign key once per row (most of a 100k-item submit).
``ix_items_status_lease`` indexed every item version; the partial replacement and the new
``ix_items_open`` hold only open items, which makes the finalisation check after each completed
batch an index probe and keeps completions from adding index entries there. Events (two per
item) were indexed by job although only job-level events are looked up that way, and outputs
by job although nothing looks them up by job: fewer index entries per item.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 05:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RUNNING = "status = 'running'"
OPEN = "status IN ('queued', 'running')"
JOB_LEVEL = "item_id IS NULL"


def upgrade() -> None:
    with op.batch_alter_table("items") as batch:
        batch.drop_constraint("fk_items_job_id_jobs", type_="foreignkey")
    with op.batch_alter_table("events") as batch:
        batch.drop_constraint("fk_events_job_id_jobs", type_="foreignkey")
    with op.batch_alter_table("outputs") as batch:
        batch.drop_constraint("fk_outputs_job_id_jobs", type_="foreignkey")
    op.drop_index("ix_outputs_job_id", table_name="outputs")
    op.drop_index("ix_events_job_id", table_name="events")
    op.create_index("ix_events_job_level", "events", ["job_id"],
                    postgresql_where=sa.text(JOB_LEVEL), sqlite_where=sa.text(JOB_LEVEL))
    op.drop_index("ix_items_status_lease", table_name="items")
    op.create_index("ix_items_running_lease", "items", ["lease_expires_at"],
                    postgresql_where=sa.text(RUNNING), sqlite_where=sa.text(RUNNING))
    op.create_index("ix_items_open", "items", ["job_id"],
                    postgresql_where=sa.text(OPEN), sqlite_where=sa.text(OPEN))


def downgrade() -> None:
    op.drop_index("ix_items_open", table_name="items")
    op.drop_index("ix_items_running_lease", table_name="items")
    op.create_index("ix_items_status_lease", "items", ["status", "lease_expires_at"])
    op.drop_index("ix_events_job_level", table_name="events")
    op.create_index("ix_events_job_id", "events", ["job_id"])
    op.create_index("ix_outputs_job_id", "outputs", ["job_id"])
    with op.batch_alter_table("outputs") as batch:
        batch.create_foreign_key("fk_outputs_job_id_jobs", "jobs", ["job_id"], ["id"],
                                 ondelete="CASCADE")
    with op.batch_alter_table("events") as batch:
        batch.create_foreign_key("fk_events_job_id_jobs", "jobs", ["job_id"], ["id"],
                                 ondelete="CASCADE")
    with op.batch_alter_table("items") as batch:
        batch.create_foreign_key("fk_items_job_id_jobs", "jobs", ["job_id"], ["id"],
                                 ondelete="CASCADE")
