"""What a worker reads about the chunk it runs: the job's status and attempt cap, the chunks of a
job (embedded mode runs them all), and which items must run alone (suspects)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import cache
from typing import Any, NamedTuple

from sqlalchemy import Select, bindparam, literal_column, select, text, union_all
from sqlalchemy.orm import Session

from loom.jobs.hot_pg import hot_connection, statement
from loom.jobs.types import Chunk
from loom.models import Item, Job, Lease, Outbox, utcnow

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
    row = session.execute(_statements()[0], {"p_job": job_id}).one_or_none()
    if row is None:
        return None, 0, 1
    return row.status, int(row.item_count or 0), int(row.max_attempts or 1)


class ClaimHead(NamedTuple):
    """What a worker reads before each claim: the job's status, item count and attempt cap, and
    the chunk's suspects (only looked for while the job is claimable)."""

    status: str | None
    item_count: int
    max_attempts: int
    suspects: list[int]


# One statement and no transaction (autocommit) on PostgreSQL: the head and the suspects used to
# be a BEGIN, two reads and a ROLLBACK before every claim. The suspects are suspect_indexes'.
_HEAD_PG = text("""
SELECT j.status, j.item_count, j.max_attempts,
       CASE WHEN j.status IN ('queued', 'running') THEN ARRAY(
           SELECT s.index FROM (
               SELECT i.index FROM items AS i
               WHERE i.job_id = j.id AND i.phase = 'retry'
                 AND i.index >= :start AND i.index < :end
                 AND i.status = 'queued' AND i.attempts > i.attempts_excused
                 AND (i.available_at IS NULL OR i.available_at <= :now)
                 AND (i.error_code IS NULL OR i.error_code = ANY(CAST(:codes AS text[])))
               UNION ALL
               -- Read only while the job has an expired lease row (nearly never).
               SELECT i.index FROM items AS i
               WHERE EXISTS (SELECT 1 FROM leases AS l
                             WHERE l.job_id = j.id AND l.expires_at < :now)
                 AND i.job_id = j.id AND i.phase IN ('open', 'retry')
                 AND i.index >= :start AND i.index < :end
                 AND i.status = 'running' AND i.lease_expires_at < :now
                 AND i.attempts > i.attempts_excused
           ) AS s ORDER BY s.index LIMIT :limit) END AS suspects
FROM jobs AS j WHERE j.id = :job_id
""")
_HEAD_PG_SQL = statement(_HEAD_PG)


def claim_head(session: Session, *, chunk: Chunk, limit: int,
               now: datetime | None = None) -> ClaimHead:
    """``job_head`` and, while the job is claimable, ``suspect_indexes`` of ``chunk``."""
    now = now or utcnow()
    if session.get_bind().dialect.name == "postgresql":
        with hot_connection(session) as conn:
            rows = conn.execute(_HEAD_PG_SQL, {"job_id": chunk.job_id, "start": chunk.start,
                                               "end": chunk.end, "now": now, "limit": limit,
                                               "codes": list(SUSPECT_CODES)})
        row = rows[0] if rows else None
        if row is None:
            return ClaimHead(None, 0, 1, [])
        status, item_count, max_attempts, suspects = row
        return ClaimHead(status, int(item_count or 0), int(max_attempts or 1),
                         list(suspects or []))
    status, count, cap = job_head(session, job_id=chunk.job_id)
    suspects = (suspect_indexes(session, chunk=chunk, limit=limit, now=now)
                if status in ("queued", "running") else [])
    return ClaimHead(status, count, cap, suspects)


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
    (fetch_failed, storage_error) are no suspects: they run in normal batches.

    Items waiting for another attempt: an index probe (ix_items_retried). Running items whose
    lease expired: only while the job has an expired lease row (a probe of ix_leases_job_id),
    the chunk's open items (ix_items_open) read for their lease, as no index tracks the running
    ones (migration 0015); a chunk is a few batches. The phase terms are literals so that
    SQLite can match those partial indexes."""
    now = now or utcnow()
    return list(session.scalars(_statements()[1], {
        "p_job": chunk.job_id, "p_start": chunk.start, "p_end": chunk.end, "p_now": now,
        "p_limit": limit}))


@cache
def _statements() -> tuple[Select[Any], Select[Any]]:
    """job_head's and suspect_indexes' statements, built once: read before every claim, they
    cost more to build than to run on SQLite (0.2 ms per item claimed at batch 32)."""
    jobs, items = Job.__table__, Item.__table__
    head = (select(jobs.c.status, jobs.c.item_count, jobs.c.max_attempts)
            .where(jobs.c.id == bindparam("p_job")))
    now = bindparam("p_now", type_=items.c.available_at.type)
    in_chunk = (items.c.index >= bindparam("p_start"), items.c.index < bindparam("p_end"))
    retried = select(items.c.index).where(
        items.c.job_id == bindparam("p_job"),
        items.c.phase == literal_column("'retry'"),
        *in_chunk,
        items.c.status == literal_column("'queued'"),
        items.c.attempts > items.c.attempts_excused,  # an attempt was spent (not excused)
        items.c.available_at.is_(None) | (items.c.available_at <= now),
        items.c.error_code.is_(None) | items.c.error_code.in_(SUSPECT_CODES),
    )
    leases = Lease.__table__
    expired = select(items.c.index).where(
        # Read only while the job has an expired lease row (nearly never).
        select(1).where(leases.c.job_id == bindparam("p_job"), leases.c.expires_at < now)
        .exists(),
        items.c.job_id == bindparam("p_job"),
        items.c.phase.in_([literal_column("'open'"), literal_column("'retry'")]),
        *in_chunk,
        items.c.status == literal_column("'running'"),
        items.c.lease_expires_at < now,
        items.c.attempts > items.c.attempts_excused,
    )
    both = union_all(retried, expired).subquery()
    return head, select(both.c.index).order_by(both.c.index).limit(bindparam("p_limit"))


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
