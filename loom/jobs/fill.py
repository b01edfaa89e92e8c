"""Filling a batch from other jobs: a worker whose own job ran dry tops its batch up with fresh
queued items of other jobs that the same model call can serve.

Why: a job of 5 items is a batch of 5, its own chunk message, claim, model call and completion.
A thousand such jobs ran at a fifth of the rate of one job of the same 5,000 items (issue 12),
because the model ran batches of 5 and the fixed costs were paid per job. Topped up, the model
runs full batches whatever the jobs' sizes; the chunk messages of the jobs whose items were taken
find nothing and ack at once.

What may share a batch: jobs with the same task, model, params (one model call) and result-cache
setting, of any tenant
when the model is built in or an ``hf:`` model, of the same tenant when it is a registered
(fine-tuned) model (its name means something else to another tenant). Only fresh items are
taken: queued, available, no attempt spent. An item retried after a crash or a model error runs
through its own job's chunk, where the poison-input rules (run it alone) apply.

Order: priority first; within a priority, tenants take turns (each tenant's oldest job, then each
tenant's second oldest, ...), so one tenant's thousand jobs do not starve another's one; then
submission order, then item order. Fencing is unchanged: each item is claimed under the worker's
lease and completed per item, so filling changes who runs an item, never how often.

PostgreSQL only (``SKIP LOCKED`` lets concurrent fillers split the rows). On SQLite, where the
embedded engine runs one job at a time, there is nothing to fill from and ``claim_fill`` returns
no items.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from sqlalchemy import text
from sqlalchemy.orm import Session

from loom import tasks
from loom.jobs.claims_pg import LEASE_SET
from loom.jobs.hot_pg import hot_connection, json_values, statement
from loom.jobs.types import ClaimedItem

# The jobs a batch of ``:like`` may be filled from. ``turn`` is the job's place in its tenant's
# queue (oldest first): ordering by (priority, turn) makes the tenants alternate.
_MATES = """
    SELECT o.id, o.tenant_id, o.priority, o.created_at, o.item_count,
           row_number() OVER (PARTITION BY o.tenant_id
                              ORDER BY o.priority DESC, o.created_at, o.id) AS turn
    FROM jobs AS o, jobs AS l
    WHERE l.id = :like AND o.id <> :like AND o.status = :status
      AND o.task = l.task AND o.model_name = l.model_name
      AND CAST(o.params AS text) = CAST(l.params AS text) AND o.use_cache = l.use_cache
      AND l.task = ANY(:batched)
      AND (l.model_name = ANY(:shared) OR l.model_name LIKE :hf OR o.tenant_id = l.tenant_id)
      -- The fair-share scheduler's choice (loom.jobs.shares): one tenant, one lane.
      AND (CAST(:tenant AS text) IS NULL OR o.tenant_id = :tenant)
      AND o.item_count BETWEEN :min_items AND :max_items
      -- A job whose items are all in flight, backing off or retried has nothing to give.
      AND EXISTS (SELECT 1 FROM items WHERE items.job_id = o.id AND items.phase = 'open'
                  AND items.status = 'queued'
                  AND items.attempts = items.attempts_excused
                  AND (items.available_at IS NULL OR items.available_at <= :now))
"""

# Queued jobs become running before their items are claimed (the claim below takes items of
# running jobs only, as the per-job claim does). Job rows alone, in their own statement: a claim
# never holds item locks while it waits for a job row, so it cannot deadlock with cancel_job,
# which locks the job row first.
_START = text(f"""
WITH mates AS ({_MATES}),
picked AS (
    SELECT jobs.id FROM jobs JOIN mates ON mates.id = jobs.id
    ORDER BY mates.priority DESC, mates.turn, mates.created_at, mates.id
    LIMIT :jobs
    FOR UPDATE OF jobs SKIP LOCKED
)
UPDATE jobs SET status = 'running', started_at = :now, updated_at = :now
FROM picked WHERE jobs.id = picked.id AND jobs.status = 'queued'
RETURNING jobs.id
""")

# The claim: like claims_pg's, over the running mates instead of one job's range. At most :jobs
# mates are looked at (each has at least one fresh item, so :limit of them are enough unless
# other workers take those items first). A fresh item has spent no attempt, so the job's attempt
# cap never excludes it.
_FILL = text(f"""
WITH cfg AS (
    SELECT set_config('synchronous_commit', 'off', true)
),
mates AS ({_MATES}),
top AS (
    SELECT mates.* FROM mates, cfg
    ORDER BY mates.priority DESC, mates.turn, mates.created_at, mates.id
    LIMIT :jobs
),
picked AS MATERIALIZED (
    SELECT i.id, top.tenant_id, top.priority, top.turn, top.created_at AS job_created,
           top.item_count AS job_items
    FROM items AS i JOIN top ON i.job_id = top.id
    WHERE i.phase = 'open' AND i.status = 'queued' AND i.attempts = i.attempts_excused
      AND (i.available_at IS NULL OR i.available_at <= :now)
    ORDER BY top.priority DESC, top.turn, top.created_at, i.job_id, i.index
    LIMIT :limit
    FOR UPDATE OF i SKIP LOCKED
),
upd AS (
    UPDATE items SET {LEASE_SET}
    FROM picked
    WHERE items.id = picked.id AND items.status = 'queued'
    RETURNING items.id, items.job_id, items.index, items.input, items.attempts,
              picked.tenant_id, picked.priority, picked.turn, picked.job_created,
              picked.job_items
),
-- One lease row per job (loom.models.Lease); no 'claimed' events (see claims_pg._CLAIM).
lz AS (
    INSERT INTO leases (job_id, tenant_id, worker_id, item_ids, expires_at, created_at)
    SELECT job_id, tenant_id, :worker_id, array_agg(id ORDER BY id), :expires, :now
    FROM upd GROUP BY job_id, tenant_id
    RETURNING id, job_id
),
tc AS (
    INSERT INTO tenant_claims (tenant_id, job_items, claimed_at, n)
    SELECT tenant_id, job_items, :now, count(*) FROM upd GROUP BY tenant_id, job_items
)
SELECT upd.id, upd.job_id, upd.index, CAST(upd.input AS text) AS input, upd.attempts,
       upd.tenant_id, l.task, l.model_name, CAST(l.params AS text) AS params, lz.id
FROM upd JOIN lz ON lz.job_id = upd.job_id, jobs AS l WHERE l.id = :like
ORDER BY upd.priority DESC, upd.turn, upd.job_created, upd.job_id, upd.index
""")


_START_SQL, _FILL_SQL = statement(_START), statement(_FILL)


def claim_fill(
    session: Session,
    *,
    like: str,
    worker_id: str,
    limit: int,
    lease_seconds: float,
    now: datetime,
    tenant_id: str | None = None,
    job_items: tuple[int, int] = (0, 2**31 - 1),
) -> list[ClaimedItem]:
    """Lease up to ``limit`` fresh items of jobs other than ``like`` that one model call can run
    together with ``like``'s items; see the module docstring for which and in what order. Each
    statement is its own transaction, as in claims_pg. ``tenant_id`` and ``job_items`` (the
    jobs' size range, both ends included) narrow the mates to the fair-share scheduler's pick."""
    if limit < 1 or session.get_bind().dialect.name != "postgresql":
        return []
    args = {"like": like, "shared": list(tasks.BUILTIN_MODELS), "hf": tasks.HF_PREFIX + "%",
            "batched": tasks.names(), "jobs": limit, "limit": limit, "now": now,
            "tenant": tenant_id, "min_items": job_items[0], "max_items": job_items[1]}
    with hot_connection(session) as conn:
        rows = conn.execute(_FILL_SQL, {**args, "status": "running", "worker_id": worker_id,
                                        "expires": now + timedelta(seconds=lease_seconds)})
        if len(rows) < limit:
            # Start queued mates, then claim again: a thousand small jobs submitted together
            # are still queued when the first worker gets to them.
            started = conn.execute(_START_SQL, {**args, "status": "queued",
                                                "jobs": limit - len(rows)})
            if started:
                rows += conn.execute(_FILL_SQL, {
                    **args, "status": "running", "limit": limit - len(rows),
                    "worker_id": worker_id,
                    "expires": now + timedelta(seconds=lease_seconds)})
    if not rows:
        return []
    params_text = rows[0][8]
    params = json.loads(params_text) if params_text else {}
    inputs = json_values([r[3] for r in rows])
    return [
        ClaimedItem(id=item_id, job_id=job_id, tenant_id=tenant_id, index=index, task=task,
                    model_name=model_name, params=dict(params or {}), input=item_input,
                    attempts=attempts, lease_id=lease_id)
        for (item_id, job_id, index, _, attempts, tenant_id, task, model_name, _,
             lease_id), item_input in zip(rows, inputs, strict=True)
    ]
