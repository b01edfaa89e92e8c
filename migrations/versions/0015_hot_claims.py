"""items: claims that write no index entries; leases, one row per claim; no 'claimed' events

Why: a claim used to write every item twice over. Its UPDATE moved the item to running, which
changed ``status`` and ``lease_expires_at``, both indexed, so PostgreSQL stored a new version of
the row with an entry in each of the table's five indexes, and the claim added a 'claimed' event
row (two more entries) per item: 7 of the 13 index entries and 2 of the 4 row versions an item
cost between submission and its output (bench/control_plane.py).

Now no index of ``items`` reads a column the claim changes, so the claim is a HOT update (the
new version on the same page, no index entry):

- ``phase`` (a stored generated column) is what the indexes read instead of ``status``: 'open'
  for queued and running items alike, 'retry' for a queued item that spent an attempt, else the
  status. A claim turns queued into running, which leaves ``phase`` as it was.
- ``ix_items_open`` and ``ix_items_retried`` say the same as before, in ``phase``;
  ``ix_items_job_status`` becomes ``ix_items_unsucceeded``, the failed and cancelled items (the
  pages and retry_failed look those up; a job's counts read its rows anyway); the running items'
  index ``ix_items_running_lease`` is gone.
- What it answered (which items are in flight, whose lease expired, which jobs run) comes from
  ``leases``: one row per claim statement (its job, tenant, worker, expiry and the ids of the
  items it took), written by the claim, extended by the heartbeat, deleted by the completion
  that ends its last item (or, expired, by the reconciler once its items are freed).
- fillfactor 50: a HOT update needs room on the row's page, and a claim updates a whole run of
  consecutive rows at once. Rows already stored keep their pages; new ones get the room. The
  same for the two indexes every item is in (pk_items, uq_items_job_id_index): the completion
  (not HOT: the phase changes) adds one entry per item beside its first, and a full leaf made
  PostgreSQL run a bottom-up deletion pass (heap visits) for room, 5% of the database's CPU per
  item in bench/control_plane.py.

Events: the claim writes none. An attempt's claim (who, when) is on the row that ends the
attempt: ``outputs.claimed_at``, ``events.claimed_at`` (lease_expired, retry_scheduled, failed,
cancelled, released); loom.jobs.queries.item_history shows it as the attempt's 'claimed' event,
as it shows the output as the 'succeeded' one. 'claimed' rows written before stay and are not
doubled.

The result cache's index holds only outputs that can be served from (a key, not reused).

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# loom.models.ITEM_PHASE, as of this revision.
PHASE = ("CASE WHEN status IN ('succeeded', 'failed', 'cancelled') THEN status "
         "WHEN status = 'queued' AND attempts > attempts_excused THEN 'retry' ELSE 'open' END")
OPEN = "phase IN ('open', 'retry')"
# Every item is in these two indexes (see fillfactor above).
ITEM_INDEXES = ("pk_items", "uq_items_job_id_index")
RETRIED = "phase = 'retry'"
UNSUCCEEDED = "phase IN ('failed', 'cancelled')"
CACHEABLE = "cache_key IS NOT NULL AND cached_from IS NULL"

OLD_RUNNING = "status = 'running'"
OLD_OPEN = "status IN ('queued', 'running')"
OLD_RETRIED = "status = 'queued' AND attempts > attempts_excused"


def _where(sql: str) -> dict[str, sa.TextClause]:
    return {"postgresql_where": sa.text(sql), "sqlite_where": sa.text(sql)}


def upgrade() -> None:
    bind = op.get_bind()
    pg = bind.dialect.name == "postgresql"
    for name in ("ix_items_job_status", "ix_items_running_lease", "ix_items_open",
                 "ix_items_retried"):
        op.drop_index(name, table_name="items")
    phase = sa.Column("phase", sa.String(16), sa.Computed(PHASE, persisted=True))
    if pg:
        op.add_column("items", phase)
        op.execute("ALTER TABLE items SET (fillfactor = 50)")
        for index in ITEM_INDEXES:
            op.execute(f"ALTER INDEX {index} SET (fillfactor = 50)")
    else:
        # SQLite adds a stored generated column only by rebuilding the table.
        with op.batch_alter_table("items", recreate="always") as batch:
            batch.add_column(phase)
    op.create_index("ix_items_open", "items", ["job_id", "index"], **_where(OPEN))
    op.create_index("ix_items_retried", "items", ["job_id", "index"], **_where(RETRIED))
    op.create_index("ix_items_unsucceeded", "items", ["job_id", "phase", "index"],
                    **_where(UNSUCCEEDED))

    ids = sa.JSON().with_variant(postgresql.ARRAY(sa.BigInteger()), "postgresql")
    op.create_table(
        "leases",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("tenant_id", sa.String(32), nullable=False),
        sa.Column("worker_id", sa.String(200), nullable=False),
        sa.Column("item_ids", ids, nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_leases_job_id", "leases", ["job_id"])
    # The items running now get the lease rows their claims would have written: one per job
    # and worker, until the latest of their leases.
    agg = "array_agg(i.id ORDER BY i.id)" if pg else "json_group_array(i.id)"
    op.execute(f"""
        INSERT INTO leases (job_id, tenant_id, worker_id, item_ids, expires_at, created_at)
        SELECT i.job_id, j.tenant_id, i.lease_owner, {agg},
               max(i.lease_expires_at), min(i.started_at)
        FROM items AS i JOIN jobs AS j ON j.id = i.job_id
        WHERE i.status = 'running' AND i.lease_owner IS NOT NULL
          AND i.lease_expires_at IS NOT NULL AND i.started_at IS NOT NULL
        GROUP BY i.job_id, j.tenant_id, i.lease_owner
    """)

    with op.batch_alter_table("outputs") as batch:
        batch.add_column(sa.Column("claimed_at", sa.DateTime(), nullable=True))
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("claimed_at", sa.DateTime(), nullable=True))
    op.drop_index("ix_outputs_cache_key", table_name="outputs")
    op.create_index("ix_outputs_cache_key", "outputs", ["cache_key"], **_where(CACHEABLE))


def downgrade() -> None:
    bind = op.get_bind()
    pg = bind.dialect.name == "postgresql"
    op.drop_index("ix_outputs_cache_key", table_name="outputs")
    op.create_index("ix_outputs_cache_key", "outputs", ["cache_key"])
    # The claims the lease rows stand for become 'claimed' events again, as they were written.
    op.execute("""
        INSERT INTO events (job_id, item_id, kind, attempt, worker_id, created_at)
        SELECT i.job_id, i.id, 'claimed', i.attempts, i.lease_owner, i.started_at
        FROM items AS i
        WHERE i.status = 'running' AND i.lease_owner IS NOT NULL AND i.started_at IS NOT NULL
    """)
    with op.batch_alter_table("events") as batch:
        batch.drop_column("claimed_at")
    with op.batch_alter_table("outputs") as batch:
        batch.drop_column("claimed_at")
    op.drop_table("leases")
    for name in ("ix_items_unsucceeded", "ix_items_retried", "ix_items_open"):
        op.drop_index(name, table_name="items")
    if pg:
        op.execute("ALTER TABLE items RESET (fillfactor)")
        for index in ITEM_INDEXES:
            op.execute(f"ALTER INDEX {index} RESET (fillfactor)")
        op.drop_column("items", "phase")
    else:
        with op.batch_alter_table("items", recreate="always") as batch:
            batch.drop_column("phase")
    op.create_index("ix_items_job_status", "items", ["job_id", "status", "index"])
    op.create_index("ix_items_running_lease", "items", ["lease_expires_at"], **_where(OLD_RUNNING))
    op.create_index("ix_items_open", "items", ["job_id", "index"], **_where(OLD_OPEN))
    op.create_index("ix_items_retried", "items", ["job_id", "index"], **_where(OLD_RETRIED))
