"""PostgreSQL fast path for the two hottest statements: claim a batch, complete a batch.

Why a separate path: on PostgreSQL a batch used to cost ~16 round trips and ~100 per-row
statements (executemany of Output and Event rows), which capped the control plane near 1,200
items/s per process. Here each of claim and complete is ONE statement, run as its own
transaction (autocommit, so no BEGIN/COMMIT round trips; run through loom.jobs.hot_pg, prepared,
without the Session's layers): data-modifying CTEs update the items
and insert the event (and output) rows set-based; a batch travels as one JSON array of rows.

The guarantees are those of the portable path in ``claims.py``:
- claim: one conditional ``UPDATE ... FROM (SELECT ... FOR UPDATE SKIP LOCKED LIMIT n)``
  ``RETURNING``; claimable = queued and available, or running with an expired lease; attempts
  under the job's cap; job not cancelling/cancelled.
- complete: fenced per item (``status = 'running' AND lease_owner = me AND attempts = my
  attempt``); outputs and events are written only for rows this statement won.
A single statement is atomic, so autocommit does not weaken either.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from datetime import datetime, timedelta

from sqlalchemy import text
from sqlalchemy.orm import Session

from loom.jobs.hot_pg import hot_connection, statement
from loom.jobs.types import ClaimedItem, ItemResult

# What a claim sets on the rows it takes (this claim's lease, one more attempt); loom.jobs.fill's
# claim sets the same.
LEASE_SET = """
        status = 'running', lease_owner = :worker_id, lease_expires_at = :expires,
        attempts = items.attempts + 1, available_at = NULL, started_at = :now,
        finished_at = NULL, updated_at = :now"""

# The claim for a job that is already running (the common case). ``j`` yields the job row when
# it is claimable at all; items are only picked when it is 'running' (a 'queued' job is first
# moved to running by _START, below).
#
# The claim commits without waiting for its WAL flush (synchronous_commit off for this one
# statement's transaction; the completion's commit still waits and flushes everything before
# it). Losing a claim in a database crash is harmless: its items are claimable again, and the
# worker's completion no longer matches the fence (lease_owner), so nothing finishes twice.
_CLAIM = text(f"""
WITH cfg AS (
    SELECT set_config('synchronous_commit', 'off', true)
),
j AS (
    SELECT status, max_attempts, tenant_id, task, model_name, params, item_count
    FROM jobs, cfg WHERE id = :job_id AND status IN ('queued', 'running')
),
picked AS MATERIALIZED (
    SELECT i.id, i.status AS old_status
    FROM items AS i, j
    WHERE j.status = 'running'
      AND i.job_id = :job_id AND i.index >= :start AND i.index < :end
      AND i.attempts - i.attempts_excused < j.max_attempts
      AND ((i.status = 'queued' AND (i.available_at IS NULL OR i.available_at <= :now))
           OR (i.status = 'running' AND i.lease_expires_at < :now))
    ORDER BY i.index
    LIMIT :limit
    FOR UPDATE OF i SKIP LOCKED
),
upd AS (
    UPDATE items SET {LEASE_SET},
        error_code = CASE WHEN picked.old_status = 'running' THEN 'worker_lost'
                          ELSE items.error_code END,
        error_message = CASE WHEN picked.old_status = 'running' THEN :takeover
                             ELSE items.error_message END
    FROM picked
    WHERE items.id = picked.id
    RETURNING items.id, items.index, items.input, items.attempts, picked.old_status
),
ev AS (
    INSERT INTO events (job_id, item_id, kind, attempt, worker_id, message, created_at)
    SELECT :job_id, id, 'lease_expired', attempts - 1, NULL, :takeover, :now
    FROM upd WHERE old_status = 'running'
    UNION ALL
    SELECT :job_id, id, 'claimed', attempts, :worker_id, NULL, :now FROM upd
),
-- The fair-share window (loom.jobs.shares): one row per claim that took anything.
tc AS (
    INSERT INTO tenant_claims (tenant_id, job_items, claimed_at, n)
    SELECT j.tenant_id, j.item_count, :now, count(*) FROM j, upd
    GROUP BY j.tenant_id, j.item_count
)
SELECT j.status, j.tenant_id, j.task, j.model_name, CAST(j.params AS text) AS params,
       upd.id, upd.index, CAST(upd.input AS text) AS input, upd.attempts
FROM j LEFT JOIN upd ON true
ORDER BY upd.index
""")

# A queued job becomes running before its first claim: the job row alone, in its own statement,
# so a claim never holds item locks while it waits for the job row (cancel_job locks the job row
# first, then its items).
_START = text("""
UPDATE jobs SET status = 'running', started_at = :now, updated_at = :now
WHERE id = :job_id AND status = 'queued'
""")

# Completion: the batch arrives as one JSON array of rows (encoded in C, parsed server-side:
# far cheaper than binding one Python-dumped array per column); one UPDATE (the fence) decides
# which rows this worker won, and only those rows get an output. One row back per job.
_COMPLETE = text("""
WITH v AS MATERIALIZED (
    SELECT * FROM json_to_recordset(CAST(:rows AS json)) AS v(
        item_id bigint, attempt integer, kind text, text text, storage_key text,
        content_type text, sha256 text, size_bytes bigint, input_sha256 text, model_name text,
        model_version text, weights_sha256 text, seed bigint, timings json,
        cache_key text, cached_from bigint, details json)
),
won AS (
    UPDATE items SET
        status = 'succeeded', lease_owner = NULL, lease_expires_at = NULL, error_code = NULL,
        error_message = NULL, finished_at = :now, updated_at = :now
    FROM v
    -- Meant as one primary-key probe per row of v. The ids also come as an array (= ANY is
    -- estimated at its length) and v is parsed once (MATERIALIZED): on a table not analysed
    -- yet (a new database's first job) the planner may still choose a scan of the table and a
    -- nested loop over v, but no longer re-parses the recordset per row (18.5 -> 12.2 ms for
    -- 128 rows). The status test is written so that no index can serve it: otherwise the
    -- planner may scan every running item of every worker through an index on status instead.
    WHERE items.id = ANY(CAST(:ids AS bigint[])) AND items.id = v.item_id
      AND (items.status = 'running') IS TRUE AND items.lease_owner = :worker_id
      AND (v.attempt IS NULL OR items.attempts = v.attempt)
    RETURNING items.id, items.job_id, items.attempts, v.*
),
outs AS (
    INSERT INTO outputs (item_id, job_id, kind, text, storage_key, content_type, sha256,
                         size_bytes, input_sha256, model_name, model_version, weights_sha256,
                         task, params, seed, attempt, worker_id, timings, cache_key,
                         cached_from, details, created_at)
    SELECT won.id, won.job_id, won.kind, won.text, won.storage_key, won.content_type,
           won.sha256, won.size_bytes, won.input_sha256,
           COALESCE(won.model_name, jobs.model_name), won.model_version, won.weights_sha256,
           jobs.task, COALESCE(jobs.params, CAST('{}' AS json)), won.seed, won.attempts,
           :worker_id, won.timings, won.cache_key, won.cached_from, won.details, :now
    FROM won JOIN jobs ON jobs.id = won.job_id
    ORDER BY won.id
)
-- No 'succeeded' event row: the output row is that record (attempt, worker, time, timings);
-- loom.jobs.queries.item_lineage shows it as the item's 'succeeded' event.
SELECT job_id, count(*) FROM won GROUP BY job_id
""")

# Run after the completion committed, on the same connection: the last completer of a job sees
# no open items here. An index probe on the partial index ix_items_open.
_OPEN_JOBS = text("""
SELECT j.id FROM unnest(CAST(:job_ids AS text[])) AS j(id)
WHERE EXISTS (SELECT 1 FROM items WHERE items.job_id = j.id AND status IN ('queued', 'running'))
""")


_CLAIM_SQL, _START_SQL, _COMPLETE_SQL, _OPEN_JOBS_SQL = (
    statement(s) for s in (_CLAIM, _START, _COMPLETE, _OPEN_JOBS))


def claim(
    session: Session, *, job_id: str, start: int, end: int, worker_id: str, limit: int,
    lease_seconds: float, now: datetime,
) -> list[ClaimedItem]:
    """Claim in one statement (a queued job is moved to running first, in a statement of its
    own)."""
    takeover = f"lease expired; taken over by {worker_id} at {now.isoformat()}"
    args = {"job_id": job_id, "start": start, "end": end, "limit": limit, "now": now,
            "expires": now + timedelta(seconds=lease_seconds), "worker_id": worker_id,
            "takeover": takeover}
    with hot_connection(session) as conn:
        rows = conn.execute(_CLAIM_SQL, args)
        if rows and rows[0][0] == "queued":
            conn.execute(_START_SQL, {"job_id": job_id, "now": now})
            rows = conn.execute(_CLAIM_SQL, args)
    if not rows or rows[0][0] != "running":
        return []  # no such job, or cancelling / cancelled / finished
    _, tenant_id, task, model_name, params_text = rows[0][:5]
    # json columns come back as text: parsed here once for the job, once per item.
    params = json.loads(params_text) if params_text else {}
    return [
        ClaimedItem(id=item_id, job_id=job_id, tenant_id=tenant_id, index=index, task=task,
                    model_name=model_name, params=dict(params or {}),
                    input=json.loads(input_text) if input_text else {}, attempts=attempts)
        for *_, item_id, index, input_text, attempts in rows if item_id is not None
    ]


# One encoder for all rows: json.dumps with non-default arguments builds a new one per call.
_dumps = json.JSONEncoder(separators=(",", ":")).encode


def complete(
    session: Session, *, worker_id: str, results: Sequence[ItemResult], now: datetime,
    open_jobs: Collection[str] = (),
) -> tuple[int, set[str]]:
    """Fenced completion of a batch in one statement. Returns how many rows it won (0 when
    every row was lost to another worker), and the jobs among theirs that had no open items
    left once it had committed (candidates for maybe_finalize); ``open_jobs`` (known to have
    open items) are not looked at."""
    rows = [
        {"item_id": r.item_id, "attempt": r.attempt, "kind": r.kind, "text": r.text,
         "storage_key": r.storage_key, "content_type": r.content_type, "sha256": r.sha256,
         "size_bytes": r.size_bytes, "input_sha256": r.input_sha256,
         "model_name": r.model_name, "model_version": r.model_version,
         "weights_sha256": r.weights_sha256, "seed": r.seed, "timings": r.timings,
         "cache_key": r.cache_key, "cached_from": r.cached_from, "details": r.details}
        for r in results
    ]
    params = {"rows": _dumps(rows), "ids": [r.item_id for r in results], "worker_id": worker_id,
              "now": now}
    with hot_connection(session) as conn:
        won = conn.execute(_COMPLETE_SQL, params)
        job_ids = sorted({job_id for job_id, _ in won} - set(open_jobs))
        still_open = (
            {job_id for job_id, in conn.execute(_OPEN_JOBS_SQL, {"job_ids": job_ids})}
            if job_ids else set()
        )
    return sum(n for _, n in won), set(job_ids) - still_open
