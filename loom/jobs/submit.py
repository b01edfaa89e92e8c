"""Submission (job + items + outbox in one transaction) and publishing the outbox."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from loom.db import begin_write
from loom.errors import Conflict, IdempotencyConflict, InvalidRequest, NotFound
from loom.jobs.limits import Limits, admit_items, admit_job
from loom.jobs.types import CLAIMABLE_JOB, Chunk, add_events
from loom import tasks
from loom.models import Item, ItemStatus, Job, JobStatus, Outbox, new_id, utcnow

# Rows per INSERT batch: bounds statement size and memory while keeping round trips few.
_INSERT_BATCH = 10_000


def request_hash(body: Any) -> str:
    """sha256 of the canonical JSON of a request (sorted keys, no spaces): the one fingerprint
    that idempotency compares, whoever submits (API body, CLI, SDK)."""
    raw = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(raw.encode("utf-8", errors="surrogatepass")).hexdigest()


def request_fingerprint(
    *, task: str, model_name: str, items: Sequence[dict[str, Any]], params: dict[str, Any] | None
) -> str:
    """The fingerprint of a submission whose caller supplied no request hash of its own."""
    return request_hash(
        {"task": task, "model": model_name, "params": params or {}, "items": list(items)})


def existing_for_key(
    session: Session, *, tenant_id: str, idempotency_key: str, request_hash: str
) -> Job | None:
    """The job an idempotency key already made, or None; the same key with another request is
    an IdempotencyConflict. The one idempotency path (API and submit_job alike)."""
    job = session.scalar(
        select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == idempotency_key)
    )
    if job is not None and job.request_hash != request_hash:
        raise IdempotencyConflict(
            f"Idempotency-Key {idempotency_key!r} was already used with a different request"
        )
    return job


# The most urgent message priority (worker.app maps 0..9 onto Redis' steps).
FAST_LANE_PRIORITY = 9


def submit_job(
    session: Session,
    *,
    tenant_id: str,
    task: str,
    model_name: str,
    items: Iterable[dict[str, Any]],
    params: dict[str, Any] | None = None,
    priority: int = 0,
    webhook_url: str | None = None,
    webhook_events: Sequence[str] | None = None,
    parent_job_id: str | None = None,
    metadata: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    chunk_size: int,
    max_attempts: int,
    job_id: str | None = None,
    use_cache: bool = True,
    limits: Limits | None = None,
    fast_lane_items: int = 0,
    now: datetime | None = None,
) -> Job:
    """Create a job with its items and one outbox row per chunk, atomically.

    Nothing is published here: the caller runs ``publish_pending`` after the commit, and the
    reconciler publishes whatever a crash left behind, so no accepted item is ever lost.

    ``job_id``: the caller may choose the id (``new_id()``) so that inline inputs can be stored
    under ``input_key(tenant, job_id, ...)`` before the job row exists. When an idempotency key
    matches an earlier job, that job (with its own id) is returned.

    ``items`` may be any iterable (a generator over a million-row table): rows are inserted in
    bounded batches as they come, so memory does not grow with the job. An iterable that raises
    midway rolls the whole job back. With an idempotency key and no ``request_hash``, a
    non-sequence is read into a list first (its fingerprint needs every item before the lookup).

    ``limits``: the configured tenant limits (loom.jobs.limits); the tenant's own overrides
    apply over them, and a job over one is refused whole (LimitExceeded, JobTooLarge).
    ``fast_lane_items``: a job of at most this many items is published in the fast lane (the
    broker's most urgent priority; the workers' fair share bounds its share, loom.jobs.shares).
    """
    tasks.get(task)  # InvalidRequest naming the valid tasks
    if chunk_size < 1 or max_attempts < 1:
        raise InvalidRequest("chunk_size and max_attempts must be >= 1")
    now = now or utcnow()
    if idempotency_key is not None and request_hash is None:
        items = items if isinstance(items, Sequence) else list(items)
        request_hash = request_fingerprint(
            task=task, model_name=model_name, items=items, params=params
        )

    begin_write(session)
    try:
        if idempotency_key is not None:
            assert request_hash is not None
            existing = existing_for_key(
                session,
                tenant_id=tenant_id,
                idempotency_key=idempotency_key,
                request_hash=request_hash,
            )
            if existing is not None:
                session.commit()
                return existing
        if parent_job_id is not None:
            parent = session.get(Job, parent_job_id)
            if parent is None or parent.tenant_id != tenant_id:
                raise NotFound(f"no job {parent_job_id}")

        tenant_limits = (None if limits is None else
                         admit_job(session, tenant_id=tenant_id, defaults=limits, now=now))
        job_id = job_id or new_id()
        job = Job(
            id=job_id,
            tenant_id=tenant_id,
            task=task,
            model_name=model_name,
            params=params or {},
            status=JobStatus.queued.value,
            priority=priority,
            webhook_url=webhook_url,
            webhook_events=list(webhook_events) if webhook_events else None,
            parent_job_id=parent_job_id,
            job_metadata=metadata or {},
            idempotency_key=idempotency_key,
            request_hash=request_hash,
            item_count=0,  # set below, once the items are counted as they are inserted
            chunk_size=chunk_size,
            max_attempts=max_attempts,
            use_cache=use_cache,
            created_at=now,
            updated_at=now,
        )
        session.add(job)
        session.flush()  # the job row must exist before the items' foreign keys point at it

        count = _insert_items(session, job_id=job_id, items=items, now=now)
        if count == 0:
            raise InvalidRequest("a job needs at least one item")
        if tenant_limits is not None:
            admit_items(session, tenant_id=tenant_id, limits=tenant_limits, count=count)
        job.item_count = count  # flushed with the commit
        lane = FAST_LANE_PRIORITY if count <= fast_lane_items else priority
        for lo in range(0, count, _INSERT_BATCH * chunk_size):
            session.execute(insert(Outbox), [
                {"job_id": job_id, "chunk_start": start,
                 "chunk_end": min(start + chunk_size, count), "priority": lane,
                 "created_at": now, "publish_count": 0}
                for start in range(lo, min(lo + _INSERT_BATCH * chunk_size, count), chunk_size)
            ])
        add_events(
            session,
            [{"job_id": job_id, "kind": "submitted", "message": f"{count} items",
              "created_at": now}],
        )
        session.commit()
        return job
    except IntegrityError as exc:
        session.rollback()
        if idempotency_key is None:
            raise Conflict(f"job {job_id} already exists") from exc
        # A concurrent submission with the same key won the unique constraint (PostgreSQL).
        assert request_hash is not None
        existing = existing_for_key(
            session, tenant_id=tenant_id, idempotency_key=idempotency_key, request_hash=request_hash
        )
        session.commit()
        if existing is None:
            raise
        return existing
    except BaseException:
        session.rollback()
        raise


def _insert_items(
    session: Session, *, job_id: str, items: Iterable[dict[str, Any]], now: datetime
) -> int:
    """Insert the items inside the session's transaction, in bulk and in bounded batches;
    returns how many there were.

    Submission speed is dominated by per-row Python work, so rows are serialised once here and
    handed to the driver's bulk path: COPY on PostgreSQL (psycopg), executemany on SQLite.
    Either way a 100k-item job costs a handful of round trips, not 100k, and only one batch
    of rows is in memory at a time.
    """
    conn = session.connection()
    dialect = conn.dialect
    queued = ItemStatus.queued.value
    columns = ("job_id", "index", "status", "input", "metadata", "attempts", "updated_at")
    numbered = enumerate(items)
    count = 0

    def batches() -> Iterator[list[tuple[int, dict[str, Any]]]]:
        nonlocal count
        while batch := list(itertools.islice(numbered, _INSERT_BATCH)):
            count += len(batch)
            yield batch

    raw = conn.connection.driver_connection
    if dialect.name == "postgresql" and dialect.driver == "psycopg":
        # COPY text built here in large blocks: psycopg's write_row formats row by row in
        # Python, which cost more than the JSON encoding itself.
        quoted = ", ".join(f'"{c}"' for c in columns)
        head = f"{_copy_text(job_id)}\t"
        tail = f"\t0\t{now.isoformat(sep=' ')}\n"
        with raw.cursor() as cur, cur.copy(f"COPY items ({quoted}) FROM STDIN") as copy:
            for batch in batches():
                copy.write("".join([
                    f"{head}{i}\t{queued}\t{_copy_text(_dumps(spec.get('input') or {}))}\t"
                    f"{_copy_null(spec.get('metadata'))}{tail}"
                    for i, spec in batch
                ]))
    elif dialect.name == "sqlite":
        # The same text SQLAlchemy's SQLite DateTime writes, so comparisons stay lexical.
        stamp = DateTime().dialect_impl(dialect).bind_processor(dialect)(now)  # type: ignore[misc]
        quoted = ", ".join(f'"{c}"' for c in columns)
        marks = ", ".join("?" for _ in columns)
        cur = raw.cursor()
        try:
            for batch in batches():
                cur.executemany(f"INSERT INTO items ({quoted}) VALUES ({marks})", [
                    (job_id, i, queued, _dumps(spec.get("input") or {}),
                     None if (meta := spec.get("metadata")) is None else _dumps(meta), 0, stamp)
                    for i, spec in batch
                ])
        finally:
            cur.close()
    else:  # any other backend: SQLAlchemy's portable bulk insert (insertmanyvalues)
        for batch in batches():
            session.execute(insert(Item), [
                {"job_id": job_id, "index": i, "status": queued, "input": spec.get("input") or {},
                 "item_metadata": spec.get("metadata"), "attempts": 0, "updated_at": now}
                for i, spec in batch
            ])
    return count


# One encoder for all rows: json.dumps with non-default arguments builds a new one per call.
# ensure_ascii (the default) keeps control characters escaped, so only backslashes need care
# in COPY text.
_dumps = json.JSONEncoder(separators=(",", ":")).encode

_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_text(value: str) -> str:
    """A value in PostgreSQL's COPY text format (backslash, tab, newline, CR escaped)."""
    return value.translate(_COPY_ESCAPES) if "\\" in value or not value.isprintable() else value


def _copy_null(meta: Any) -> str:
    return "\\N" if meta is None else _copy_text(_dumps(meta))


def publish_pending(
    session: Session,
    *,
    publish: Callable[[Chunk], None],
    job_id: str | None = None,
    limit: int = 1000,
    now: datetime | None = None,
) -> int:
    """Publish outbox rows never published (or reset by retry/reconcile). Returns the count.

    Publishing happens outside any transaction (a slow broker must not hold DB locks); rows are
    marked afterwards. A crash in between means a second publish later: harmless, because
    claims are idempotent (at-least-once delivery).
    """
    now = now or utcnow()
    stmt = (
        select(Outbox.id, Outbox.job_id, Outbox.chunk_start, Outbox.chunk_end, Outbox.priority)
        .join(Job, Job.id == Outbox.job_id)
        .where(Outbox.published_at.is_(None), Job.status.in_(CLAIMABLE_JOB))
        .order_by(Outbox.priority.desc(), Outbox.id)
        .limit(limit)
    )
    if job_id is not None:
        stmt = stmt.where(Outbox.job_id == job_id)
    rows = session.execute(stmt).all()
    session.commit()  # end the read transaction before talking to the broker
    return publish_rows(session, rows=rows, publish=publish, now=now)


def publish_rows(
    session: Session, *, rows: Sequence[Any], publish: Callable[[Chunk], None], now: datetime
) -> int:
    """Publish (id, job_id, chunk_start, chunk_end, priority) outbox rows; mark those sent."""
    sent: list[int] = []
    try:
        for row in rows:
            publish(Chunk(job_id=row.job_id, start=row.chunk_start, end=row.chunk_end,
                          priority=row.priority))
            sent.append(row.id)
    finally:
        # Even when the broker fails midway, record what did go out.
        if sent:
            begin_write(session)
            session.execute(
                update(Outbox)
                .where(Outbox.id.in_(sent))
                .values(published_at=now, publish_count=Outbox.publish_count + 1)
                .execution_options(synchronize_session=False)
            )
            session.commit()
    return len(sent)
