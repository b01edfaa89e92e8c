"""The reconciler: repairs everything that a lost message or a dead process can leave behind.

Run periodically (Celery beat, or the embedded loop). Each step is idempotent, so running it
twice, or on two machines at once, is harmless.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, and_, bindparam, delete, exists, or_, select, text, true, update
from sqlalchemy.orm import Session

from loom.db import begin_write
from loom.jobs.finalize import complete_finalization, maybe_finalize
from loom.jobs.leases import lease_items, running_jobs, running_under_lease
from loom.jobs.shares import prune_claims
from loom.jobs.submit import publish_pending, publish_rows
from loom.jobs.types import (
    CLAIMABLE_JOB,
    OPEN_ITEM_PHASE,
    OPEN_JOB,
    Chunk,
    ReconcileReport,
    add_events,
)
from loom.models import Item, ItemStatus, Job, JobStatus, Lease, Outbox, utcnow
from loom.storage import Store

CLAIM_RETENTION = timedelta(minutes=15)


def worker_lost_message(attempts: int) -> str:
    times = "once" if attempts == 1 else f"{attempts} times"
    return f"the worker running this item died {times} (lease expired); giving up"


def free_expired_leases(
    session: Session, *, now: datetime, limit: int = 10_000
) -> tuple[ReconcileReport, set[str]]:
    """Expired leases: under the cap -> queued; at the cap -> failed worker_lost; in a
    cancelling job -> cancelled. Returns the counts and the jobs whose items reached an end.

    The items come from the expired lease rows (loom.jobs.leases: every running item is in one
    of its owner's), not from a scan of the open items; each row goes once nothing of it runs
    under its worker any more."""
    report = ReconcileReport()
    begin_write(session)
    dialect = session.get_bind().dialect.name
    u = lease_items(dialect)
    # An item may be in several expired rows (claimed again by the same worker): IN, not a join.
    in_expired = select(u.c.value).select_from(Lease).join(u, true()).where(
        Lease.expires_at < now)
    rows = session.execute(
        select(Item.id, Item.job_id, Item.index, Item.attempts, Item.attempts_excused,
               Item.lease_owner, Item.started_at,
               Job.max_attempts, Job.status, Job.chunk_size)
        .join(Job, Job.id == Item.job_id)
        .where(Item.id.in_(in_expired), Item.status == ItemStatus.running.value,
               Item.lease_expires_at < now)
        .order_by(Item.id)
        .limit(limit)
        .with_for_update(of=Item, skip_locked=True)
    ).all()
    if not rows:
        _drop_done_leases(session, dialect=dialect)
        session.commit()
        return report, set()
    updates: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    ended: set[str] = set()
    requeued_chunks: set[tuple[str, int]] = set()
    for r in rows:
        base = {"job_id": r.job_id, "item_id": r.id, "attempt": r.attempts,
                "worker_id": r.lease_owner, "claimed_at": r.started_at, "created_at": now}
        events.append({**base, "kind": "lease_expired", "error_code": "worker_lost",
                       "message": "lease expired"})
        if r.status == JobStatus.cancelling.value:
            status, code, message = ItemStatus.cancelled.value, "cancelled", "job cancelled"
            report.cancelled += 1
            events.append({**base, "kind": "cancelled"})
        elif r.attempts - r.attempts_excused >= r.max_attempts:
            status, code, message = (ItemStatus.failed.value, "worker_lost",
                                     worker_lost_message(r.attempts - r.attempts_excused))
            report.failed += 1
            events.append({**base, "kind": "failed", "error_code": code, "message": message})
        else:
            status, code = ItemStatus.queued.value, "worker_lost"
            message = f"lease expired on attempt {r.attempts}; requeued"
            report.requeued += 1
            requeued_chunks.add((r.job_id, r.index - r.index % r.chunk_size))
        if status != ItemStatus.queued.value:
            ended.add(r.job_id)
        updates.append({"b_id": r.id, "b_status": status, "b_code": code, "b_message": message,
                        "b_finished": None if status == ItemStatus.queued.value else now})
    table = Item.__table__
    session.execute(
        update(table)
        # Re-checked: the lease may have been renewed since our SELECT (SQLite has no row locks,
        # but BEGIN IMMEDIATE already excludes other writers; on PostgreSQL the rows are locked).
        .where(table.c.id == bindparam("b_id"), table.c.status == ItemStatus.running.value)
        .values(status=bindparam("b_status"), error_code=bindparam("b_code"),
                error_message=bindparam("b_message"), finished_at=bindparam("b_finished"),
                lease_owner=None, lease_expires_at=None, available_at=None, updated_at=now),
        updates,
    )
    # The messages for these chunks were consumed by the dead worker: publish them again.
    for job_id, start in sorted(requeued_chunks):
        session.execute(
            update(Outbox).where(Outbox.job_id == job_id, Outbox.chunk_start == start)
            .values(published_at=None).execution_options(synchronize_session=False)
        )
    add_events(session, events)
    _drop_done_leases(session, dialect=dialect)
    session.commit()
    return report, ended


def _drop_done_leases(session: Session, *, dialect: str) -> None:
    """Lease rows none of whose items still runs under their worker: freed above, finished, or
    taken over by another claim (which wrote a row of its own). Mostly expired ones; a live one
    too, when its worker did not end it (a completion without end_leases): a row covers no item
    it does not hold, and the items in flight are counted from them. Whether an item still
    runs is tested by the DELETE itself, so a claim or heartbeat meanwhile keeps its row."""
    session.execute(
        delete(Lease).where(~running_under_lease(dialect, worker=Lease.worker_id))
        .execution_options(synchronize_session=False))


def stale_chunks(session: Session, *, now: datetime, stale_after_seconds: float,
                 limit: int = 1000) -> list[Any]:
    """Published chunks with claimable queued items and no recent message: either the last
    publish is older than stale_after while none of the job's items runs (call it after
    ``free_expired_leases``, as ``reconcile`` does), or an item became claimable (backoff over)
    after it."""
    if session.get_bind().dialect.name == "postgresql":
        # Many cheap index probes whose estimate crosses jit_above_cost: compiling the plan took
        # 19 of the query's 20 ms at 100,000 items.
        session.execute(text("SET LOCAL jit = off"))
    rows = session.execute(stale_chunks_query(
        now=now, stale_after_seconds=stale_after_seconds, limit=limit,
        dialect=session.get_bind().dialect.name)).all()
    session.commit()
    return list(rows)


def stale_chunks_query(*, now: datetime, stale_after_seconds: float, limit: int,
                       dialect: str = "postgresql") -> Select[Any]:
    """The query of ``stale_chunks`` (its test reads PostgreSQL's plan for it)."""
    cutoff = now - timedelta(seconds=stale_after_seconds)

    def queued_in_chunk(*conditions: Any) -> Any:
        # One index probe per chunk, stopped at the first match: both indexes the planner picks
        # from hold the chunk's queued items together (ix_items_open: job_id, index of the open
        # items; ix_items_job_status: job_id, status, index). Written as EXISTS, PostgreSQL made
        # it a hash semi-join on job_id alone; and with (job_id, status) alone, a probe read
        # every queued item of the job. Either checked every chunk against every queued item of
        # its job: 2.5 s for one 100,000-item job, growing with the square of the job's size,
        # every reconcile of every worker process.
        return (
            select(Item.id)
            .where(Item.job_id == Outbox.job_id, OPEN_ITEM_PHASE,
                   Item.status == ItemStatus.queued.value,
                   Item.index >= Outbox.chunk_start, Item.index < Outbox.chunk_end,
                   *conditions)
            .limit(1)
            .correlate(Outbox)
            .scalar_subquery()
        )

    # A job some worker is running is not stuck: with lingering, that worker claims across the
    # whole job, and a chunk whose message waits in the broker's queue behind others is not
    # lost. Republishing such chunks every stale_after seconds only queued duplicates behind the
    # originals (up to ``limit`` per reconcile of every process) for the whole length of a long
    # job. Once nothing of the job runs, a lost message is republished. ("Running" means a live
    # lease row here: ``reconcile`` frees the expired ones first.) One pass over the lease rows,
    # not a probe per chunk.
    running = running_jobs(dialect, now=now).subquery("running_jobs")
    stale = and_(
        Outbox.published_at < cutoff,
        running.c.job_id.is_(None),
        queued_in_chunk(or_(Item.available_at.is_(None), Item.available_at <= now)).is_not(None),
    )
    # An item whose backoff ended after the chunk's last publish: no message covers it yet. Only
    # a retried item waits for a backoff (loom.jobs.claims.fail_items): ix_items_retried, which
    # holds only those, answers it.
    due = queued_in_chunk(Item.attempts > Item.attempts_excused, Item.available_at.is_not(None),
                          Item.available_at > Outbox.published_at,
                          Item.available_at <= now).is_not(None)
    return (
        select(Outbox.id, Outbox.job_id, Outbox.chunk_start, Outbox.chunk_end, Outbox.priority)
        .join(Job, Job.id == Outbox.job_id)
        .outerjoin(running, running.c.job_id == Outbox.job_id)
        .where(Outbox.published_at.is_not(None), Job.status.in_(CLAIMABLE_JOB), or_(stale, due))
        .order_by(Outbox.priority.desc(), Outbox.published_at)
        .limit(limit)
    )


def reconcile(
    session: Session,
    *,
    publish: Callable[[Chunk], None],
    stale_after_seconds: float,
    now: datetime | None = None,
    store: Store | None = None,
    on_finalized: Callable[[Job], None] | None = None,
) -> ReconcileReport:
    now = now or utcnow()
    report, ended = free_expired_leases(session, now=now)
    report.published = publish_pending(session, publish=publish, now=now)
    report.republished = publish_rows(
        session, rows=stale_chunks(session, now=now, stale_after_seconds=stale_after_seconds),
        publish=publish, now=now,
    )

    # Missed finalisations: a completer that died after committing its items but before
    # maybe_finalize, or a finaliser that died (or lost the store) while in "finalizing".
    cutoff = now - timedelta(seconds=stale_after_seconds)
    no_open = ~exists().where(Item.job_id == Job.id, OPEN_ITEM_PHASE)
    candidates = set(session.scalars(
        select(Job.id).where(Job.status.in_(OPEN_JOB), no_open)
    )) | ended
    stuck = list(session.scalars(
        select(Job.id).where(Job.status == JobStatus.finalizing.value, Job.updated_at < cutoff)
    ))
    session.commit()
    for job_id in sorted(candidates):
        if maybe_finalize(session, job_id=job_id, store=store, on_finalized=on_finalized,
                          now=now):
            report.finalized += 1
    for job_id in stuck:
        if complete_finalization(session, job_id=job_id, store=store,
                                 on_finalized=on_finalized, now=now):
            report.finalized += 1
    # The fair-share window reads seconds; a quarter of an hour is kept to look back at.
    prune_claims(session, before=now - CLAIM_RETENTION)
    return report
