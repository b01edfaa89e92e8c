"""outputs: no foreign key to items

Why: the completion inserts one output per item, and PostgreSQL checks the key with a trigger per
row (an SPI query under a KEY SHARE row lock): about 6% of the database's CPU in a claim ->
complete loop (bench/control_plane.py, perf). The check guards nothing that can happen: an output
is written only by the completion statement, in the same statement that moves its item (found
by primary key) to succeeded, and items are never deleted. The unique index on item_id stays:
it is what makes a second output for one item impossible.

Also from this revision on, a completion writes no 'succeeded' event row: the output row records
the same attempt, worker, time and timings, and loom.jobs.queries.item_history shows it as the
item's 'succeeded' event (rows written before stay and are not doubled).

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("outputs") as batch:
        batch.drop_constraint("fk_outputs_item_id_items", type_="foreignkey")


def downgrade() -> None:
    with op.batch_alter_table("outputs") as batch:
        batch.create_foreign_key("fk_outputs_item_id_items", "items", ["item_id"], ["id"],
                                 ondelete="CASCADE")
