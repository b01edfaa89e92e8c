"""What a worker reads about the chunk it runs: the job's status and attempt cap, the chunks of a
job (embedded mode runs them all), and which items must run alone (suspects)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from loom.jobs.types import Chunk
from loom.models import Item, ItemStatus, Job, Outbox, utcnow

# Error codes of an earlier attempt after which an item runs alone: its process died
# (worker_lost, also set when a claim takes an expired lease over) or its batch raised.
SUSPECT_CODES = ("worker_lost", "model_error")


def job_status(session: Session, *, job_id: str) -> str | None:
    return session.scalar(select(Job.status).where(Job.id == job_id))


def job_max_attempts(session: Session, *, job_id: str) -> int:
    return int(session.scalar(select(Job.max_attempts).where(Job.id == job_id)) or 1)


def job_item_count(session: Session, *, job_id: str) -> int:
    return int(session.scalar(select(Job.item_count).where(Job.id == job_id)) or 0)


def job_head(session: Session, *, job_id: str) -> tuple[str | None, int, int]:
    """(status, item count, max attempts) in one read: what a worker checks before each claim
    and caches (the count and the cap are fixed once the job is published)."""
    row = session.execute(
        select(Job.status, Job.item_count, Job.max_attempts).where(Job.id == job_id)
    ).one_or_none()
    if row is None:
        return None, 0, 1
    return row.status, int(row.item_count or 0), int(row.max_attempts or 1)


def job_chunks(session: Session, *, job_id: str) -> list[Chunk]:
    """The job's chunks in index order (the outbox rows are the chunk registry)."""
    rows = session.execute(
        select(Outbox.chunk_start, Outbox.chunk_end, Outbox.priority)
        .where(Outbox.job_id == job_id)
        .order_by(Outbox.chunk_start)
    ).all()
    return [Chunk(job_id, int(s), int(e), int(p or 0)) for s, e, p in rows]


def suspect_indexes(
    session: Session, *, chunk: Chunk, limit: int, now: datetime | None = None
) -> list[int]:
    """Indexes in the chunk that are claimable again after an attempt that may have crashed its
    process (lease expired) or broken its batch (model_error). Items retried after an I/O error
    (fetch_failed, storage_error) are no suspects: they run in normal batches."""
    now = now or utcnow()
    rows = session.scalars(
        select(Item.index)
        .where(
            Item.job_id == chunk.job_id,
            Item.index >= chunk.start,
            Item.index < chunk.end,
            Item.attempts > Item.attempts_excused,  # an attempt was spent (not excused)
            (
                (Item.status == ItemStatus.queued.value)
                & ((Item.available_at.is_(None)) | (Item.available_at <= now))
            )
            | ((Item.status == ItemStatus.running.value) & (Item.lease_expires_at < now)),
            (Item.status == ItemStatus.running.value)
            | Item.error_code.is_(None)
            | Item.error_code.in_(SUSPECT_CODES),
        )
        .order_by(Item.index)
        .limit(limit)
    )
    return list(rows)


def suspect_ids(session: Session, *, item_ids: Iterable[int]) -> set[int]:
    """Of these (just claimed, attempts > 1) items, those whose last attempt died or broke."""
    ids: Sequence[int] = list(item_ids)
    if not ids:
        return set()
    rows = session.execute(
        select(Item.id, Item.error_code).where(
            Item.id.in_(ids),
            # An attempt before this claim was spent (outage releases are excused).
            Item.attempts - Item.attempts_excused > 1,
        )
    ).all()
    return {r.id for r in rows if r.error_code is None or r.error_code in SUSPECT_CODES}
