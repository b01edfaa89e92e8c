"""Leases: claim, heartbeat, fenced completion and failure, and the worker side of cancel.

Fencing: every write a worker makes is conditional on ``status = 'running' AND lease_owner = me``
(and, when the worker passes it, the attempt number of its claim). A worker whose lease expired
and was taken over cannot overwrite the newer attempt's state; its UPDATE simply matches nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    and_,
    bindparam,
    case,
    false,
    insert,
    literal_column,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.orm import Session, aliased

from loom.db import begin_write
from loom.jobs import claims_pg
from loom.jobs.finalize import finalize_jobs, maybe_finalize
from loom.jobs.types import (
    CLAIMABLE_JOB,
    MAX_BACKOFF_SECONDS,
    ClaimedItem,
    ItemFailure,
    ItemResult,
    add_events,
)
from loom.models import Item, ItemStatus, Job, JobStatus, Output, utcnow
from loom.storage import Store

RUNNING = ItemStatus.running.value
QUEUED = ItemStatus.queued.value


def _is_postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def claim_items(
    session: Session,
    *,
    job_id: str,
    start: int,
    end: int,
    worker_id: str,
    limit: int,
    lease_seconds: float,
    now: datetime | None = None,
) -> list[ClaimedItem]:
    """Lease up to ``limit`` claimable items of [start, end) in ONE conditional UPDATE.

    PostgreSQL (claims_pg, one statement): the inner SELECT takes row locks with SKIP LOCKED, so
    concurrent claimers split the rows instead of queueing on them. SQLite (below): BEGIN
    IMMEDIATE serialises writers and the UPDATE ... WHERE id IN (SELECT ... LIMIT n) is atomic.
    """
    now = now or utcnow()
    if limit < 1:
        return []
    if _is_postgresql(session):
        return claims_pg.claim(session, job_id=job_id, start=start, end=end,
                               worker_id=worker_id, limit=limit, lease_seconds=lease_seconds,
                               now=now)
    begin_write(session)
    job = session.execute(
        select(Job.status, Job.max_attempts, Job.tenant_id, Job.task, Job.model_name, Job.params)
        .where(Job.id == job_id)
    ).one_or_none()
    if job is None or job.status not in CLAIMABLE_JOB or limit < 1:
        session.rollback()
        return []

    def claimable(it: Any) -> Any:
        return and_(
            it.job_id == job_id,
            it.index >= start,
            it.index < end,
            # Implied by the test below, but written as ix_items_open's predicate is, so that
            # SQLite walks that index (open items in job order) instead of every finished item.
            it.status.in_([literal_column("'queued'"), literal_column("'running'")]),
            # An item whose spent attempts reached the cap is never claimed again (poison input).
            it.attempts - it.attempts_excused < job.max_attempts,
            or_(
                and_(it.status == QUEUED, or_(it.available_at.is_(None), it.available_at <= now)),
                and_(it.status == RUNNING, it.lease_expires_at < now),
            ),
        )

    if job.status == JobStatus.queued.value:
        # Job row before item rows: cancel_job locks in that order too, so a claim racing a
        # cancel on PostgreSQL waits instead of deadlocking. Rolled back if nothing is claimed.
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.queued.value)
            .values(status=JobStatus.running.value, started_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )

    # An alias, so the subquery is never correlated to the UPDATE's own "items". A MATERIALIZED
    # CTE, because PostgreSQL may otherwise plan "id IN (SELECT ... LIMIT n FOR UPDATE SKIP
    # LOCKED)" as a nested-loop semi-join that re-runs the subquery per row and ignores LIMIT.
    inner = aliased(Item)
    picked = (
        select(inner.id)
        .where(claimable(inner))
        .order_by(inner.index)
        .limit(limit)
        .with_for_update(skip_locked=True)  # renders nothing on SQLite
        .cte("picked")
        .prefix_with("MATERIALIZED")
    )
    # RETURNING only sees new values; to know which rows were taken over from an expired lease
    # (for the lease_expired event) we write a marker unique to this claim into error_message.
    takeover = f"lease expired; taken over by {worker_id} at {now.isoformat()}"
    was_running = Item.status == RUNNING
    rows = session.execute(
        update(Item)
        .where(Item.id.in_(select(picked.c.id)), claimable(Item))
        .values(
            status=RUNNING,
            lease_owner=worker_id,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            attempts=Item.attempts + 1,
            available_at=None,
            started_at=now,
            finished_at=None,
            error_code=case((was_running, "worker_lost"), else_=Item.error_code),
            error_message=case((was_running, takeover), else_=Item.error_message),
            updated_at=now,
        )
        .returning(Item.id, Item.index, Item.input, Item.attempts, Item.error_message)
        .execution_options(synchronize_session=False)
    ).all()
    if not rows:
        session.rollback()
        return []

    events: list[dict[str, Any]] = []
    for r in rows:
        if r.error_message == takeover:
            events.append({"job_id": job_id, "item_id": r.id, "kind": "lease_expired",
                           "attempt": r.attempts - 1, "message": takeover, "created_at": now})
        events.append({"job_id": job_id, "item_id": r.id, "kind": "claimed",
                       "attempt": r.attempts, "worker_id": worker_id, "created_at": now})
    add_events(session, events)
    session.commit()
    return [
        ClaimedItem(id=r.id, job_id=job_id, tenant_id=job.tenant_id, index=r.index,
                    task=job.task, model_name=job.model_name, params=dict(job.params or {}),
                    input=dict(r.input or {}), attempts=r.attempts)
        for r in sorted(rows, key=lambda r: r.index)
    ]


def heartbeat(
    session: Session,
    *,
    item_ids: Sequence[int],
    worker_id: str,
    lease_seconds: float,
    now: datetime | None = None,
) -> int:
    """Extend the leases this worker still holds; returns how many it still holds."""
    if not item_ids:
        return 0
    now = now or utcnow()
    begin_write(session)
    result = session.execute(
        update(Item)
        .where(Item.id.in_(list(item_ids)), Item.status == RUNNING,
               Item.lease_owner == worker_id)
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return int(result.rowcount)  # type: ignore[attr-defined]


def _fence(worker_id: str, entries: Sequence[ItemResult | ItemFailure]) -> Any:
    """WHERE clause: running, leased by worker_id, and (when known) at the claimed attempt."""
    plain = [e.item_id for e in entries if e.attempt is None]
    pinned = [(e.item_id, e.attempt) for e in entries if e.attempt is not None]
    ids = or_(
        Item.id.in_(plain) if plain else false(),
        tuple_(Item.id, Item.attempts).in_(pinned) if pinned else false(),
    )
    return and_(ids, Item.status == RUNNING, Item.lease_owner == worker_id)


def _finalize_all(
    session: Session, job_ids: set[str], store: Store | None,
    on_finalized: Callable[[Job], None] | None, now: datetime, *, drained: bool = False,
) -> None:
    # After our commit, in fresh statements: whoever commits the last open item sees no open
    # items here, and the conditional UPDATE in finalize_jobs picks exactly one winner.
    finalize_jobs(session, job_ids=job_ids, store=store, on_finalized=on_finalized, now=now,
                  drained=drained)


def complete_items(
    session: Session,
    *,
    worker_id: str,
    results: Sequence[ItemResult],
    store: Store | None = None,
    on_finalized: Callable[[Job], None] | None = None,
    now: datetime | None = None,
    open_jobs: Collection[str] = (),
    on_drained: Callable[[set[str]], None] | None = None,
) -> int:
    """Mark items succeeded and record their outputs, only where this worker holds the lease.

    Returns how many items this call completed (the others were lost to another worker).
    ``open_jobs``: jobs the caller knows still have open items (it holds some of their leases);
    whether they were drained is not checked (the reconciler finalises any job a wrong hint
    left behind). ``on_drained`` (PostgreSQL): the jobs this completion drained are handed to
    it, for the caller to finalise (``finalize_jobs(..., drained=True)``), instead of being
    finalised here.
    """
    if not results:
        return 0
    now = now or utcnow()
    if _is_postgresql(session):
        won_jobs, drained = claims_pg.complete(session, worker_id=worker_id, results=results,
                                               now=now, open_jobs=open_jobs)
        # maybe_finalize checks again under the job row lock; this only skips the calls that
        # would find open items anyway (nearly every batch).
        if on_drained is not None:
            if drained:
                on_drained(drained)
        else:
            _finalize_all(session, drained, store, on_finalized, now, drained=True)
        return len(won_jobs)
    begin_write(session)
    won = session.execute(
        update(Item)
        .where(_fence(worker_id, results))
        .values(status=ItemStatus.succeeded.value, lease_owner=None, lease_expires_at=None,
                error_code=None, error_message=None, finished_at=now, updated_at=now)
        .returning(Item.id, Item.job_id, Item.attempts)
        .execution_options(synchronize_session=False)
    ).all()
    if not won:
        session.commit()
        return 0
    jobs = {
        j.id: j
        for j in session.execute(
            select(Job.id, Job.task, Job.params, Job.model_name)
            .where(Job.id.in_({w.job_id for w in won}))
        )
    }
    by_id = {r.item_id: r for r in results}
    outputs: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
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
            "created_at": now,
        })
        total_ms = sum(r.timings.values()) * 1000.0 if r.timings else None
        events.append({"job_id": w.job_id, "item_id": w.id, "kind": "succeeded",
                       "attempt": w.attempts, "worker_id": worker_id,
                       "duration_ms": total_ms, "created_at": now})
    session.execute(insert(Output), outputs)
    add_events(session, events)
    session.commit()
    _finalize_all(session, {w.job_id for w in won} - set(open_jobs), store, on_finalized, now)
    return len(won)


def fail_items(
    session: Session,
    *,
    worker_id: str,
    failures: Sequence[ItemFailure],
    backoff_seconds: float,
    store: Store | None = None,
    on_finalized: Callable[[Job], None] | None = None,
    now: datetime | None = None,
) -> int:
    """Record failures (fenced). Transient errors under the attempt cap go back to the queue
    with exponential backoff; everything else ends ``failed`` with the error's code + message.
    Returns how many items this call updated."""
    if not failures:
        return 0
    now = now or utcnow()
    begin_write(session)
    owned = session.execute(
        select(Item.id, Item.job_id, Item.attempts, Item.attempts_excused, Job.max_attempts,
               Job.status)
        .join(Job, Job.id == Item.job_id)
        .where(_fence(worker_id, failures))
        .with_for_update(of=Item)  # PostgreSQL: hold the rows until we have updated them
    ).all()
    by_id = {f.item_id: f for f in failures}
    updates: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    for row in owned:
        err = by_id[row.id].error
        base = {"job_id": row.job_id, "item_id": row.id, "attempt": row.attempts,
                "worker_id": worker_id, "error_code": err.code, "created_at": now}
        if row.status == JobStatus.cancelling.value and err.transient:
            # No point retrying work nobody wants any more.
            status, available_at, message, kind = "cancelled", None, err.message, "cancelled"
        elif err.transient and (spent := row.attempts - row.attempts_excused) < row.max_attempts:
            delay = min(backoff_seconds * 2 ** max(spent - 1, 0), MAX_BACKOFF_SECONDS)
            status, available_at, kind = QUEUED, now + timedelta(seconds=delay), "retry_scheduled"
            message = err.message
        else:
            status, available_at, kind = ItemStatus.failed.value, None, "failed"
            message = err.message
            if err.transient:
                spent = row.attempts - row.attempts_excused
                message = f"{err.message} (gave up after {spent} attempts)"
        updates.append({"b_id": row.id, "b_status": status, "b_available": available_at,
                        "b_code": err.code, "b_message": message,
                        "b_finished": None if status == QUEUED else now})
        events.append({**base, "kind": kind, "message": message})
    if updates:
        table = Item.__table__
        # One executemany: each row gets its own status / backoff / error.
        session.execute(
            update(table)
            .where(table.c.id == bindparam("b_id"))
            .values(status=bindparam("b_status"), available_at=bindparam("b_available"),
                    error_code=bindparam("b_code"), error_message=bindparam("b_message"),
                    finished_at=bindparam("b_finished"), lease_owner=None,
                    lease_expires_at=None, updated_at=now),
            updates,
        )
        add_events(session, events)
    session.commit()
    ended = {row.job_id for row, u in zip(owned, updates) if u["b_status"] != QUEUED}
    _finalize_all(session, ended, store, on_finalized, now)
    return len(updates)


def cancel_remaining(
    session: Session,
    *,
    job_id: str,
    worker_id: str,
    store: Store | None = None,
    on_finalized: Callable[[Job], None] | None = None,
    now: datetime | None = None,
) -> int:
    """The worker found the job cancelling: cancel its own leased items and any queued ones."""
    now = now or utcnow()
    begin_write(session)
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    if status not in (JobStatus.cancelling.value, JobStatus.cancelled.value):
        session.rollback()
        return 0
    rows = session.execute(
        update(Item)
        .where(
            Item.job_id == job_id,
            or_(Item.status == QUEUED,
                and_(Item.status == RUNNING, Item.lease_owner == worker_id)),
        )
        .values(status=ItemStatus.cancelled.value, lease_owner=None, lease_expires_at=None,
                error_code="cancelled", error_message="job cancelled", finished_at=now,
                updated_at=now)
        .returning(Item.id, Item.attempts)
        .execution_options(synchronize_session=False)
    ).all()
    add_events(session, [
        {"job_id": job_id, "item_id": r.id, "kind": "cancelled", "attempt": r.attempts,
         "worker_id": worker_id, "created_at": now} for r in rows
    ])
    session.commit()
    maybe_finalize(session, job_id=job_id, store=store, on_finalized=on_finalized, now=now)
    return len(rows)
