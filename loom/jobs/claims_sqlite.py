"""SQLite path for the two hottest statements (claim a batch, complete a batch): the embedded
engine's, as ``claims_pg`` is the distributed one's.

The statements are built once, on the Core tables, with bound parameters. Built per call on the
ORM entities (as they were), SQLAlchemy cost ten times SQLite's own work: 0.5 ms per item claimed
and 0.3 ms per item completed at batch 32, nearly all of it building expressions, computing
their cache keys and going through the ORM's bulk paths. An embedded engine runs those beside
the model on the same cores, so every millisecond here is one the model did not get.

The guarantees are the portable ones described in ``claims.py``: BEGIN IMMEDIATE serialises
writers; the claim is one conditional ``UPDATE ... WHERE id IN (SELECT ... LIMIT n)``; the
completion is fenced per item (running, leased by this worker, at the claimed attempt).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime, timedelta
from functools import cache
from typing import Any

from sqlalchemy import (
    Executable,
    and_,
    bindparam,
    case,
    delete,
    insert,
    literal_column,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.orm import Session

from loom.db import begin_write
from loom.jobs.leases import running_under_lease
from loom.jobs.types import CLAIMABLE_JOB, ClaimedItem, ItemResult, add_events
from loom.models import Item, ItemStatus, Job, JobStatus, Lease, Output

RUNNING = ItemStatus.running.value
QUEUED = ItemStatus.queued.value

_items = Item.__table__
_jobs = Job.__table__
_outputs = Output.__table__
_leases = Lease.__table__


def _open_in_range(t: Any) -> Any:
    """Open items of [start, end), the phase terms literals written as ix_items_open's predicate
    is, so that SQLite walks that index (open items in job order)."""
    return and_(
        t.c.job_id == bindparam("p_job"),
        t.c.index >= bindparam("p_start"),
        t.c.index < bindparam("p_end"),
        t.c.phase.in_([literal_column("'open'"), literal_column("'retry'")]),
    )


def _claimable(t: Any) -> Any:
    """Claimable in [start, end): queued and available, or running with an expired lease; the
    spent attempts under the job's cap."""
    now = bindparam("p_now", type_=_items.c.available_at.type)
    return and_(
        _open_in_range(t),
        t.c.attempts - t.c.attempts_excused < bindparam("p_max_attempts"),
        or_(
            and_(t.c.status == QUEUED, or_(t.c.available_at.is_(None), t.c.available_at <= now)),
            and_(t.c.status == RUNNING, t.c.lease_expires_at < now),
        ),
    )


@cache
def _claim_statements() -> tuple[Executable, Executable, Executable, Executable, Executable]:
    now = bindparam("p_now", type_=_items.c.started_at.type)
    head = select(_jobs.c.status, _jobs.c.max_attempts, _jobs.c.tenant_id, _jobs.c.task,
                  _jobs.c.model_name, _jobs.c.params).where(_jobs.c.id == bindparam("p_job"))
    start_job = (
        update(_jobs)
        .where(_jobs.c.id == bindparam("p_job"), _jobs.c.status == JobStatus.queued.value)
        .values(status=JobStatus.running.value, started_at=now, updated_at=now)
    )
    # An alias, so the subquery is never correlated to the UPDATE's own "items"; SQLite runs an
    # uncorrelated IN (SELECT ... LIMIT n) once, and the UPDATE finds its rows by primary key.
    # The claimable test is not repeated on them (PostgreSQL's claim must): under BEGIN
    # IMMEDIATE no other writer runs between the SELECT and the UPDATE of one statement, and
    # repeating it led SQLite to walk every open item of the range instead.
    inner = _items.alias("picked")
    picked = (select(inner.c.id).where(_claimable(inner)).order_by(inner.c.index)
              .limit(bindparam("p_limit")))
    was_running = _items.c.status == RUNNING
    claim = (
        update(_items)
        .where(_items.c.id.in_(picked))
        .values(
            status=RUNNING,
            lease_owner=bindparam("p_worker"),
            lease_expires_at=bindparam("p_until", type_=_items.c.lease_expires_at.type),
            attempts=_items.c.attempts + 1,
            available_at=None,
            started_at=now,
            finished_at=None,
            error_code=case((was_running, "worker_lost"), else_=_items.c.error_code),
            error_message=case((was_running, bindparam("p_takeover")),
                               else_=_items.c.error_message),
            updated_at=now,
        )
        .returning(_items.c.id, _items.c.index, _items.c.input, _items.c.attempts,
                   _items.c.error_message)
    )
    # The leases a claim is about to take over: whose they were and since when (RETURNING
    # shows only the new row), for the lease_expired event that ends their attempt.
    expired = select(_items.c.id, _items.c.lease_owner, _items.c.started_at).where(
        _open_in_range(_items), _items.c.status == RUNNING,
        _items.c.lease_expires_at < bindparam("p_now", type_=_items.c.lease_expires_at.type))
    lease = insert(_leases).returning(_leases.c.id)
    return head, start_job, claim, expired, lease


def claim(session: Session, *, job_id: str, start: int, end: int, worker_id: str, limit: int,
          lease_seconds: float, now: datetime) -> list[ClaimedItem]:
    head, start_job, claim_stmt, expired_stmt, lease_stmt = _claim_statements()
    begin_write(session)
    job = session.execute(head, {"p_job": job_id}).one_or_none()
    if job is None or job.status not in CLAIMABLE_JOB:
        session.rollback()
        return []
    if job.status == JobStatus.queued.value:
        # Job row before item rows: cancel_job takes them in that order too. Rolled back if
        # nothing is claimed.
        session.execute(start_job, {"p_job": job_id, "p_now": now})
    # RETURNING only sees new values; to know which rows were taken over from an expired lease
    # (for the lease_expired event) we write a marker unique to this claim into error_message.
    takeover = f"lease expired; taken over by {worker_id} at {now.isoformat()}"
    held_before = {r.id: r for r in session.execute(expired_stmt, {
        "p_job": job_id, "p_start": start, "p_end": end, "p_now": now})}
    until = now + timedelta(seconds=lease_seconds)
    rows = session.execute(claim_stmt, {
        "p_job": job_id, "p_start": start, "p_end": end, "p_max_attempts": job.max_attempts,
        "p_now": now, "p_limit": limit, "p_worker": worker_id,
        "p_until": until, "p_takeover": takeover,
    }).all()
    if not rows:
        session.rollback()
        return []
    # No 'claimed' events: the row that ends each attempt records its claim (claims_pg).
    events: list[dict[str, Any]] = []
    for r in rows:
        if r.error_message == takeover:
            before = held_before.get(r.id)
            events.append({"job_id": job_id, "item_id": r.id, "kind": "lease_expired",
                           "attempt": r.attempts - 1, "message": takeover,
                           "worker_id": before.lease_owner if before else None,
                           "claimed_at": before.started_at if before else None,
                           "created_at": now})
    add_events(session, events)
    lease_id = session.execute(lease_stmt, {
        "job_id": job_id, "tenant_id": job.tenant_id, "worker_id": worker_id,
        "item_ids": sorted(r.id for r in rows), "expires_at": until, "created_at": now,
    }).scalar_one()
    session.commit()
    params = dict(job.params or {})
    return [
        ClaimedItem(id=r.id, job_id=job_id, tenant_id=job.tenant_id, index=r.index,
                    task=job.task, model_name=job.model_name, params=dict(params),
                    input=dict(r.input or {}), attempts=r.attempts, lease_id=lease_id)
        for r in sorted(rows, key=lambda r: r.index)
    ]


@cache
def _complete_statements() -> tuple[Executable, Executable, Executable]:
    now = bindparam("p_now", type_=_items.c.finished_at.type)
    won = (
        update(_items)
        .where(
            # The id list drives the primary-key lookups; the fence is tested on those rows.
            _items.c.id.in_(bindparam("p_ids", expanding=True)),
            _items.c.status == RUNNING,
            _items.c.lease_owner == bindparam("p_worker"),
            or_(_items.c.id.in_(bindparam("p_plain", expanding=True)),
                tuple_(_items.c.id, _items.c.attempts).in_(
                    bindparam("p_pinned", expanding=True))),
        )
        .values(status=ItemStatus.succeeded.value, lease_owner=None, lease_expires_at=None,
                error_code=None, error_message=None, finished_at=now, updated_at=now)
        .returning(_items.c.id, _items.c.job_id, _items.c.attempts, _items.c.started_at)
    )
    job_rows = (select(_jobs.c.id, _jobs.c.task, _jobs.c.params, _jobs.c.model_name)
                .where(_jobs.c.id.in_(bindparam("p_jobs", expanding=True))))
    return won, job_rows, insert(_outputs)


def complete(session: Session, *, worker_id: str, results: Sequence[ItemResult],
             now: datetime, end_leases: Collection[int] = ()) -> tuple[int, set[str]]:
    """Mark won items succeeded with their outputs (committed; the output row is the record of
    the success, no event row); returns how many items were won and their jobs (0: every item
    was lost to another worker). ``end_leases``: lease rows to delete if nothing of theirs runs
    any more (claims_pg.complete)."""
    won_stmt, job_rows, insert_outputs = _complete_statements()
    begin_write(session)
    won = session.execute(won_stmt, {
        "p_ids": [r.item_id for r in results],
        "p_plain": [r.item_id for r in results if r.attempt is None],
        "p_pinned": [(r.item_id, r.attempt) for r in results if r.attempt is not None],
        "p_worker": worker_id, "p_now": now,
    }).all()
    if end_leases:
        session.execute(
            delete(_leases).where(_leases.c.id.in_(list(end_leases)),
                                  _leases.c.worker_id == worker_id,
                                  ~running_under_lease("sqlite", worker=worker_id))
            .execution_options(synchronize_session=False))
    if not won:
        session.commit()
        return 0, set()
    jobs = {j.id: j for j in session.execute(job_rows, {"p_jobs": sorted({w.job_id for w in won})})}
    by_id = {r.item_id: r for r in results}
    outputs: list[dict[str, Any]] = []
    for w in won:
        r, job = by_id[w.id], jobs[w.job_id]
        outputs.append({
            "item_id": w.id, "job_id": w.job_id, "kind": r.kind, "text": r.text,
            "storage_key": r.storage_key, "content_type": r.content_type, "sha256": r.sha256,
            "size_bytes": r.size_bytes, "input_sha256": r.input_sha256,
            "model_name": r.model_name or job.model_name, "model_version": r.model_version,
            "weights_sha256": r.weights_sha256, "task": job.task, "params": job.params or {},
            "seed": r.seed, "attempt": w.attempts, "worker_id": worker_id,
            "timings": dict(r.timings), "cache_key": r.cache_key, "cached_from": r.cached_from,
            "details": r.details, "claimed_at": w.started_at, "created_at": now,
        })
    session.execute(insert_outputs, outputs)
    session.commit()
    return len(won), {w.job_id for w in won}
