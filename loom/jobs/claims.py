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
    false,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.orm import Session

from loom.db import begin_write
from loom.jobs import claims_pg, claims_sqlite
from loom.jobs.finalize import finalize_jobs, maybe_finalize
from loom.jobs.leases import extend_leases
from loom.jobs.types import (
    MAX_BACKOFF_SECONDS,
    OPEN_ITEM_PHASE,
    ClaimedItem,
    ItemFailure,
    ItemResult,
    add_events,
)
from loom.models import Item, ItemStatus, Job, JobStatus, utcnow
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
    concurrent claimers split the rows instead of queueing on them. SQLite (claims_sqlite): BEGIN
    IMMEDIATE serialises writers and the UPDATE ... WHERE id IN (SELECT ... LIMIT n) is atomic.
    """
    now = now or utcnow()
    if limit < 1:
        return []
    if _is_postgresql(session):
        return claims_pg.claim(session, job_id=job_id, start=start, end=end,
                               worker_id=worker_id, limit=limit, lease_seconds=lease_seconds,
                               now=now)
    return claims_sqlite.claim(session, job_id=job_id, start=start, end=end,
                               worker_id=worker_id, limit=limit, lease_seconds=lease_seconds,
                               now=now)


def heartbeat(
    session: Session,
    *,
    item_ids: Sequence[int],
    worker_id: str,
    lease_seconds: float,
    now: datetime | None = None,
) -> int:
    """Extend the leases this worker still holds, on the items and on their lease rows (in one
    transaction: a row never expires before its items); returns how many it still holds."""
    if not item_ids:
        return 0
    now = now or utcnow()
    until = now + timedelta(seconds=lease_seconds)
    begin_write(session)
    result = session.execute(
        update(Item)
        .where(Item.id.in_(list(item_ids)), Item.status == RUNNING,
               Item.lease_owner == worker_id)
        .values(lease_expires_at=until, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    extend_leases(session, worker_id=worker_id, item_ids=item_ids, until=until)
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
    end_leases: Collection[int] = (),
) -> int:
    """Mark items succeeded and record their outputs, only where this worker holds the lease.

    Returns how many items this call completed (the others were lost to another worker).
    ``end_leases``: the lease rows (ClaimedItem.lease_id) of which this batch ends the last
    items the worker holds; each goes in the same transaction unless an item of it still runs
    (loom.jobs.leases).
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
        n_won, drained = claims_pg.complete(session, worker_id=worker_id, results=results,
                                            now=now, open_jobs=open_jobs,
                                            end_leases=end_leases)
        # maybe_finalize checks again under the job row lock; this only skips the calls that
        # would find open items anyway (nearly every batch).
        if on_drained is not None:
            if drained:
                on_drained(drained)
        else:
            _finalize_all(session, drained, store, on_finalized, now, drained=True)
        return n_won
    n_won, won_jobs = claims_sqlite.complete(session, worker_id=worker_id, results=results,
                                             now=now, end_leases=end_leases)
    if n_won:
        _finalize_all(session, won_jobs - set(open_jobs), store, on_finalized, now)
    return n_won


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
        select(Item.id, Item.job_id, Item.attempts, Item.attempts_excused, Item.started_at,
               Job.max_attempts, Job.status)
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
                "worker_id": worker_id, "error_code": err.code, "claimed_at": row.started_at,
                "created_at": now}
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
    mine = and_(Item.status == RUNNING, Item.lease_owner == worker_id)
    # The running ones' claims, for their attempts' 'cancelled' events (the claim wrote none).
    claimed = dict(session.execute(
        select(Item.id, Item.started_at).where(Item.job_id == job_id, OPEN_ITEM_PHASE, mine)
    ).all())
    rows = session.execute(
        update(Item)
        .where(Item.job_id == job_id, OPEN_ITEM_PHASE, or_(Item.status == QUEUED, mine))
        .values(status=ItemStatus.cancelled.value, lease_owner=None, lease_expires_at=None,
                error_code="cancelled", error_message="job cancelled", finished_at=now,
                updated_at=now)
        .returning(Item.id, Item.attempts)
        .execution_options(synchronize_session=False)
    ).all()
    add_events(session, [
        {"job_id": job_id, "item_id": r.id, "kind": "cancelled", "attempt": r.attempts,
         "worker_id": worker_id, "claimed_at": claimed.get(r.id), "created_at": now}
        for r in rows
    ])
    session.commit()
    maybe_finalize(session, job_id=job_id, store=store, on_finalized=on_finalized, now=now)
    return len(rows)
