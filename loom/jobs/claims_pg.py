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
from collections.abc import Collection, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.orm import Session

from loom.jobs.hot_pg import hot_connection, json_values, statement
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
# The UPDATE changes no column an index of items reads (loom.models.ITEM_PHASE), so PostgreSQL
# writes each new row version on its own page (HOT) and no index entry: an item's claim costs a
# row version, and the claim one lease row (``lz``) for all the items it took. It writes no
# 'claimed' event: the row that ends the attempt records its claim (outputs.claimed_at, or the
# event's claimed_at; see loom.jobs.queries.item_history).
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
    SELECT i.ctid AS row, i.status AS old_status, i.lease_owner AS old_owner,
           i.started_at AS old_started
    FROM items AS i, j
    WHERE j.status = 'running'
      AND i.job_id = :job_id AND i.phase IN ('open', 'retry')
      AND i.index >= :start AND i.index < :end
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
    -- The row version the scan locked, found by its place (no index descent per item).
    WHERE items.ctid = picked.row
    RETURNING items.id, items.index, items.input, items.attempts, picked.old_status,
              picked.old_owner, picked.old_started
),
-- The attempt a takeover ends: who held it and since when (its claim, in lineage).
ev AS (
    INSERT INTO events (job_id, item_id, kind, attempt, worker_id, message, claimed_at,
                        created_at)
    SELECT :job_id, id, 'lease_expired', attempts - 1, old_owner, :takeover, old_started, :now
    FROM upd WHERE old_status = 'running'
),
lz AS (
    INSERT INTO leases (job_id, tenant_id, worker_id, item_ids, expires_at, created_at)
    SELECT :job_id, j.tenant_id, :worker_id, array_agg(upd.id ORDER BY upd.id), :expires, :now
    FROM j, upd GROUP BY j.tenant_id
    RETURNING id
),
-- The fair-share window (loom.jobs.shares): one row per claim that took anything.
tc AS (
    INSERT INTO tenant_claims (tenant_id, job_items, claimed_at, n)
    SELECT j.tenant_id, j.item_count, :now, count(*) FROM j, upd
    GROUP BY j.tenant_id, j.item_count
)
SELECT j.status, j.tenant_id, j.task, j.model_name, CAST(j.params AS text) AS params,
       (SELECT id FROM lz) AS lease_id,
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
# far cheaper than binding one Python-dumped array per column), in short keys and without what
# every row shares (kind, model, version, weights: one model call, passed once) or leaves empty:
# parsing was the statement's largest cost after its index entries, and a row's key names and
# nulls were half of it (see _rows). The UPDATE (the fence) finds its rows by primary key from
# the id array and reads each row's claimed attempt from the array beside it: joining it to the
# parsed rows instead made PostgreSQL rescan them once per item (a nested loop, a third of the
# statement). Only the rows it won get an output, joined to their data by hash. The lease rows
# the worker says it is done with (``end_leases``: every item it claimed with them is in this
# batch or finished) are deleted when none of their other items still runs under this worker,
# so a lease row never goes while it covers a running item (only then is that part included).
_COMPLETE_TEMPLATE = """
WITH v AS MATERIALIZED (
    SELECT * FROM json_to_recordset(CAST(:rows AS json)) AS v(
        i bigint, a integer, o text, t text, k text, c text, h text, z bigint, n text,
        x text, v text, w text, s bigint, m json, q text, f bigint, d json)
),
won AS (
    UPDATE items SET
        status = 'succeeded', lease_owner = NULL, lease_expires_at = NULL, error_code = NULL,
        error_message = NULL, finished_at = :now, updated_at = :now
    WHERE items.id = ANY(CAST(:ids AS bigint[]))
      AND (items.status = 'running') IS TRUE AND items.lease_owner = :worker_id
      -- The claimed attempt, when the worker gave it (NULL: any).
      AND COALESCE(items.attempts = (CAST(:attempts AS integer[]))[
                       array_position(CAST(:ids AS bigint[]), items.id)], true)
    RETURNING items.id, items.job_id, items.attempts, items.started_at
),
-- The batch's job (a filled batch: its jobs), read once rather than once per output.
jb AS MATERIALIZED (
    SELECT id, task, params, model_name FROM jobs WHERE id IN (SELECT job_id FROM won)
),
outs AS (
    INSERT INTO outputs (item_id, job_id, kind, text, storage_key, content_type, sha256,
                         size_bytes, input_sha256, model_name, model_version, weights_sha256,
                         task, params, seed, attempt, worker_id, timings, cache_key,
                         cached_from, details, claimed_at, created_at)
    SELECT won.id, won.job_id, COALESCE(v.o, :kind), v.t, v.k, v.c, v.h, v.z, v.n,
           COALESCE(v.x, :model_name, jobs.model_name), COALESCE(v.v, :model_version),
           COALESCE(v.w, :weights_sha256), jobs.task, COALESCE(jobs.params, CAST('{}' AS json)),
           v.s, won.attempts, :worker_id, COALESCE(v.m, CAST('{}' AS json)), v.q, v.f, v.d,
           won.started_at, :now
    FROM won JOIN v ON v.i = won.id JOIN jb AS jobs ON jobs.id = won.job_id
    ORDER BY won.id
){ended}
-- No 'succeeded' event row: the output row is that record (attempt, worker, time, timings);
-- loom.jobs.queries.item_lineage shows it as the item's 'succeeded' event.
SELECT job_id, count(*) FROM won GROUP BY job_id
"""
_ENDED = """,
ended AS (
    DELETE FROM leases AS l
    WHERE l.id = ANY(CAST(:end_leases AS bigint[])) AND l.worker_id = :worker_id
      AND NOT EXISTS (
          SELECT 1 FROM unnest(l.item_ids) AS u(id), items
          WHERE u.id <> ALL(CAST(:ids AS bigint[])) AND items.id = u.id
            AND (items.status = 'running') IS TRUE AND items.lease_owner = :worker_id)
)"""
_COMPLETE = text(_COMPLETE_TEMPLATE.replace("{ended}", ""))
_COMPLETE_ENDING = text(_COMPLETE_TEMPLATE.replace("{ended}", _ENDED))

# Run after the completion committed, on the same connection: the last completer of a job sees
# no open items here. A probe of the partial index ix_items_open from the job's last index
# down: items finish roughly in index order, and the entries of finished ones stay in the index
# (dead) until a vacuum, so an EXISTS, which scans upwards, stepped over every finished item's
# entry (146 index pages halfway through 40,000 items; 4 backwards).
_OPEN_JOBS = text("""
SELECT j.id FROM unnest(CAST(:job_ids AS text[])) AS j(id)
WHERE (SELECT items.index FROM items
       WHERE items.job_id = j.id AND items.phase IN ('open', 'retry')
       ORDER BY items.index DESC LIMIT 1) IS NOT NULL
""")


_CLAIM_SQL, _START_SQL, _COMPLETE_SQL, _COMPLETE_ENDING_SQL, _OPEN_JOBS_SQL = (
    statement(s) for s in (_CLAIM, _START, _COMPLETE, _COMPLETE_ENDING, _OPEN_JOBS))


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
    _, tenant_id, task, model_name, params_text, lease_id = rows[0][:6]
    # json columns come back as text: parsed here once for the job, once for all items.
    params = json.loads(params_text) if params_text else {}
    rows = [r for r in rows if r[6] is not None]
    inputs = json_values([r[8] for r in rows])
    return [
        ClaimedItem(id=item_id, job_id=job_id, tenant_id=tenant_id, index=index, task=task,
                    model_name=model_name, params=dict(params or {}), input=item_input,
                    attempts=attempts, lease_id=lease_id)
        for (*_, item_id, index, _, attempts), item_input in zip(rows, inputs, strict=True)
    ]


def _dumps(value: Any) -> str:
    """JSON text, encoded by orjson: the stdlib's encoder cost 4 of a completion's ~30
    microseconds of client CPU per item. (Keys that are not strings are written as strings, as
    the stdlib does; NaN and infinities become null, which PostgreSQL's json accepts.)"""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def _pg_array(values: Iterable[int | None]) -> str:
    """An array literal: psycopg's own array dumping costs several times more per element."""
    return "{" + ",".join("NULL" if v is None else str(int(v)) for v in values) + "}"


def _rows(results: Sequence[ItemResult]) -> tuple[str, dict[str, Any]]:
    """The batch as _COMPLETE's JSON rows, and what they all share (or Nones when they differ,
    then every row carries its own)."""
    first = results[0]
    shared = all(r.kind == first.kind and r.model_name == first.model_name
                 and r.model_version == first.model_version
                 and r.weights_sha256 == first.weights_sha256 for r in results)
    rows = []
    for r in results:
        row: dict[str, Any] = {"i": r.item_id, "a": r.attempt, "t": r.text,
                               "n": r.input_sha256, "s": r.seed, "m": r.timings,
                               "q": r.cache_key}
        # Left out when empty (most are, for a text output): a missing key reads as NULL.
        for key, value in (("k", r.storage_key), ("c", r.content_type), ("h", r.sha256),
                           ("z", r.size_bytes), ("f", r.cached_from), ("d", r.details)):
            if value is not None:
                row[key] = value
        if not shared:
            row.update(o=r.kind, x=r.model_name, v=r.model_version, w=r.weights_sha256)
        rows.append(row)
    common = ({"kind": first.kind, "model_name": first.model_name,
               "model_version": first.model_version, "weights_sha256": first.weights_sha256}
              if shared else dict.fromkeys(("kind", "model_name", "model_version",
                                            "weights_sha256")))
    return _dumps(rows), common


def complete(
    session: Session, *, worker_id: str, results: Sequence[ItemResult], now: datetime,
    open_jobs: Collection[str] = (), end_leases: Collection[int] = (),
) -> tuple[int, set[str]]:
    """Fenced completion of a batch in one statement. Returns how many rows it won (0 when
    every row was lost to another worker), and the jobs among theirs that had no open items
    left once it had committed (candidates for maybe_finalize); ``open_jobs`` (known to have
    open items) are not looked at. ``end_leases``: lease rows to delete if nothing of theirs
    runs any more (see _COMPLETE)."""
    rows, common = _rows(results)
    ids = _pg_array(r.item_id for r in results)
    params = {"rows": rows, "ids": ids, "attempts": _pg_array(r.attempt for r in results),
              "worker_id": worker_id, "now": now, **common}
    sql = _COMPLETE_SQL
    if end_leases:
        sql, params["end_leases"] = _COMPLETE_ENDING_SQL, _pg_array(end_leases)
    with hot_connection(session) as conn:
        won = conn.execute(sql, params)
        job_ids = sorted({job_id for job_id, _ in won} - set(open_jobs))
        still_open = (
            {job_id for job_id, in conn.execute(_OPEN_JOBS_SQL, {"job_ids": job_ids})}
            if job_ids else set()
        )
    return sum(n for _, n in won), set(job_ids) - still_open
