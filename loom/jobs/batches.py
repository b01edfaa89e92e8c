"""SQL of the OpenAI-compatible batches (table ``batches``) and the reads over their jobs.

What a batch means, its states and its files are loom/openai_batches.py's; this module only
reads and writes rows. Every state change is a conditional UPDATE on the expected statuses, so
that of two callers racing (the API answering a poll, a worker's reconciler) one wins and the
other changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from loom.db import begin_write
from loom.errors import NotFound
from loom.models import Batch, Item, Job, utcnow


def create_batch(
    session: Session, *, batch_id: str, tenant_id: str, endpoint: str, input_file_id: str,
    completion_window: str, metadata: dict[str, Any] | None, expires_at: datetime,
    status: str, now: datetime | None = None,
) -> Batch:
    now = now or utcnow()
    begin_write(session)
    row = Batch(id=batch_id, tenant_id=tenant_id, endpoint=endpoint,
                input_file_id=input_file_id, completion_window=completion_window,
                status=status, job_ids=[], request_total=0, item_total=0, invalid_count=0,
                batch_metadata=metadata, created_at=now, expires_at=expires_at)
    session.add(row)
    session.commit()
    return row


def get_batch(session: Session, *, batch_id: str, tenant_id: str | None = None) -> Batch:
    """The batch (a fresh read); another tenant's batch is NotFound like a missing one."""
    row = session.scalar(select(Batch).where(Batch.id == batch_id)
                         .execution_options(populate_existing=True))
    if row is None or (tenant_id is not None and row.tenant_id != tenant_id):
        raise NotFound(f"no batch {batch_id[:100]}")
    return row


def list_batches(
    session: Session, *, tenant_id: str, after: str | None = None, limit: int = 20,
) -> tuple[list[Batch], bool]:
    """Newest first, keyset on (created_at, id); ``after`` is the id of the last batch of the
    previous page (OpenAI's cursor). Returns (page, has_more)."""
    stmt = select(Batch).where(Batch.tenant_id == tenant_id)
    if after is not None:
        anchor = get_batch(session, batch_id=after, tenant_id=tenant_id)
        stmt = stmt.where(or_(Batch.created_at < anchor.created_at,
                              and_(Batch.created_at == anchor.created_at, Batch.id < anchor.id)))
    rows = list(session.scalars(
        stmt.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def update_batch(
    session: Session, *, batch_id: str, statuses: Iterable[str], values: dict[str, Any],
) -> bool:
    """Set ``values`` if the batch is in one of ``statuses``; whether this call did it."""
    begin_write(session)
    try:
        n = session.execute(
            update(Batch).where(Batch.id == batch_id, Batch.status.in_(list(statuses)))
            .values(**values).execution_options(synchronize_session=False)
        ).rowcount  # type: ignore[attr-defined]
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return bool(n)


def add_batch_job(session: Session, *, batch_id: str, job_id: str) -> None:
    """Record one more job of the batch (under a row lock: the list is read and written)."""
    begin_write(session)
    try:
        row = session.scalar(select(Batch).where(Batch.id == batch_id).with_for_update()
                             .execution_options(populate_existing=True))
        if row is None:
            raise NotFound(f"no batch {batch_id}")
        if job_id not in (row.job_ids or []):
            row.job_ids = [*(row.job_ids or []), job_id]
        session.commit()
    except BaseException:
        session.rollback()
        raise


def open_batch_ids(session: Session, *, statuses: Sequence[str], limit: int = 1000) -> list[str]:
    """Batches in one of ``statuses`` (the reconciler's sweep), oldest first."""
    ids = list(session.scalars(select(Batch.id).where(Batch.status.in_(list(statuses)))
                               .order_by(Batch.created_at).limit(limit)))
    session.rollback()  # end the read: each batch is then handled in its own transactions
    return ids


def job_statuses(session: Session, *, job_ids: Sequence[str]) -> dict[str, str]:
    """Job id -> status, in one statement (a batch's jobs; the synchronous routes' waiter)."""
    if not job_ids:
        return {}
    found = {r.id: r.status for r in session.execute(
        select(Job.id, Job.status).where(Job.id.in_(list(job_ids))))}
    session.rollback()
    return found


def item_counts(session: Session, *, job_ids: Sequence[str]) -> dict[str, int]:
    """Item status -> count over the given jobs (a batch's live request counts)."""
    if not job_ids:
        return {}
    found = {status: int(n) for status, n in session.execute(
        select(Item.status, func.count()).where(Item.job_id.in_(list(job_ids)))
        .group_by(Item.status))}
    session.rollback()
    return found
