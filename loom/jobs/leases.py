"""Lease rows (loom.models.Lease): one per claim statement, naming the items it took.

No index of ``items`` tracks which items run (that is what lets a claim update them in place,
migration 0015), so whatever needs the items in flight starts from these rows: the reconciler's
expired leases, the jobs that run (stale chunks), a tenant's running items (fair share, queue
place), a worker giving its leases back. The invariant that makes it sound: every running item
is in a lease row of its lease owner whose expiry is at least the item's. Claims write the row
in the statement that takes the items; the heartbeat extends rows and items together; a row is
deleted only when none of its items still runs under its worker (``end_leases``, the
completion), or when it has expired and the reconciler has freed its items.

Giving leases back: a worker that stops cleanly (Ctrl-C on an embedded run, a graceful shutdown)
returns the items it claimed but never ran, so they are claimable at once instead of after the
lease expires. Only for items whose attempt did NOT run: the claim's attempt is refunded, so a
resumed run treats them as fresh (not as suspects that may have crashed their worker, which run
alone).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Select, bindparam, delete, false, func, select, true, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session
from sqlalchemy.sql.selectable import TableValuedAlias

from loom.db import begin_write
from loom.jobs.types import add_events
from loom.models import Item, ItemStatus, Lease, utcnow

RUNNING = ItemStatus.running.value


def lease_items(dialect: str, name: str = "u") -> TableValuedAlias:
    """The item ids of a lease row as a table (column ``value``) joined beside it: unnest on
    PostgreSQL (a bigint[]), json_each on SQLite (a JSON list)."""
    if dialect == "postgresql":
        return func.unnest(Lease.item_ids).table_valued("value").render_derived().alias(name)
    return func.json_each(Lease.item_ids).table_valued("value").alias(name)


def _dialect(session: Session) -> str:
    return session.get_bind().dialect.name


def running_under_lease(dialect: str, *, worker: Any, exclude: Sequence[int] = ()) -> Any:
    """EXISTS: an item of the (correlated) lease row still runs under ``worker`` (a column or a
    value), leaving out ``exclude``."""
    u = lease_items(dialect)
    stmt = (select(1).select_from(u).join(Item, Item.id == u.c.value)
            .where(Item.status == RUNNING, Item.lease_owner == worker))
    if exclude:
        stmt = stmt.where(Item.id.not_in(list(exclude)))
    return stmt.exists()


def extend_leases(session: Session, *, worker_id: str, item_ids: Sequence[int],
                  until: datetime) -> None:
    """The heartbeat's half on the lease rows: every row of this worker's that names one of
    ``item_ids`` lasts until ``until`` (in the caller's transaction, beside the items)."""
    if _dialect(session) == "postgresql":
        overlaps: Any = Lease.item_ids.op("&&")(
            bindparam("lease_items", list(item_ids), type_=postgresql.ARRAY(BigInteger())))
    else:
        u = lease_items("sqlite")
        overlaps = select(1).select_from(u).where(u.c.value.in_(list(item_ids))).exists()
    session.execute(update(Lease).where(Lease.worker_id == worker_id, overlaps)
                    .values(expires_at=until).execution_options(synchronize_session=False))


def end_leases(session: Session, *, worker_id: str, lease_ids: Collection[int]) -> int:
    """Delete this worker's lease rows of ``lease_ids`` that no running item needs any more
    (their items finished, failed or were given back); returns how many went."""
    if not lease_ids:
        return 0
    begin_write(session)
    n = session.execute(
        delete(Lease).where(Lease.id.in_(list(lease_ids)), Lease.worker_id == worker_id,
                            ~running_under_lease(_dialect(session), worker=worker_id))
        .execution_options(synchronize_session=False)).rowcount
    session.commit()
    return int(n or 0)


def running_jobs(dialect: str, *, now: datetime) -> Select[Any]:
    """The jobs some worker is running now: a live lease row with an item still running under
    its worker (a row outlives its items until the completion or the reconciler ends it)."""
    return (select(Lease.job_id)
            .where(Lease.expires_at >= now,
                   running_under_lease(dialect, worker=Lease.worker_id))
            .distinct())


def running_by_tenant(session: Session, *, tenant_ids: Collection[str],
                      now: datetime) -> dict[str, int]:
    """Items running under a live lease, per tenant (of ``tenant_ids``)."""
    if not tenant_ids:
        return {}
    u = lease_items(_dialect(session))
    rows = session.execute(
        select(Lease.tenant_id, func.count()).select_from(Lease).join(u, true())
        .join(Item, Item.id == u.c.value)
        .where(Lease.tenant_id.in_(list(tenant_ids)), Lease.expires_at >= now,
               Item.status == RUNNING, Item.lease_owner == Lease.worker_id)
        .group_by(Lease.tenant_id)).all()
    return {t: int(n) for t, n in rows}


def release_leases(
    session: Session,
    *,
    worker_id: str,
    item_ids: Sequence[int] | None = None,
    now: datetime | None = None,
) -> int:
    """Put back ``worker_id``'s running items (all of them, or those of ``item_ids``) as queued
    and claimable now; returns how many. Fenced like every worker write: an item whose lease
    another worker took over is not touched. The attempt ends in a 'released' event (which
    also records its claim); the worker's lease rows with nothing left running go."""
    now = now or utcnow()
    if item_ids is not None and not item_ids:
        return 0
    begin_write(session)
    dialect = _dialect(session)
    u = lease_items(dialect)
    mine = select(u.c.value).select_from(Lease).join(u, true()).where(
        Lease.worker_id == worker_id)
    held = Item.id.in_(list(item_ids)) if item_ids is not None else false()
    rows = session.execute(
        select(Item.id, Item.job_id, Item.attempts, Item.started_at)
        .where(Item.status == RUNNING, Item.lease_owner == worker_id,
               held if item_ids is not None else Item.id.in_(mine))
        .with_for_update()).all()
    if rows:
        session.execute(
            update(Item).where(Item.id.in_([r.id for r in rows]), Item.status == RUNNING,
                               Item.lease_owner == worker_id)
            .values(
                status=ItemStatus.queued.value,
                lease_owner=None,
                lease_expires_at=None,
                available_at=None,
                # Not spent, but the attempt NUMBER stays used: numbers never repeat (the fence).
                attempts_excused=Item.attempts_excused + 1,
                started_at=None,
                updated_at=now,
            ).execution_options(synchronize_session=False))
        add_events(session, [
            {"job_id": r.job_id, "item_id": r.id, "kind": "released", "attempt": r.attempts,
             "worker_id": worker_id, "message": "given back unrun by a stopping worker",
             "claimed_at": r.started_at, "created_at": now} for r in rows])
    session.execute(
        delete(Lease).where(Lease.worker_id == worker_id,
                            ~running_under_lease(dialect, worker=worker_id))
        .execution_options(synchronize_session=False))
    session.commit()
    return len(rows)
