"""Finalisation: exactly one caller moves a finished job to its terminal status.

The winner is decided by a conditional UPDATE (``status IN open states AND no open items``);
every completer calls ``maybe_finalize`` after committing its own work, so the last committer
always sees "no open items", and the row lock on the job row lets only one UPDATE succeed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import case, exists, func, select, update
from sqlalchemy.orm import Session

from loom.db import begin_write
from loom.errors import LoomError
from loom.jobs.deliveries import completed_payload, enqueue_delivery, wants
from loom.jobs.types import OPEN_ITEM_PHASE, OPEN_JOB, add_events
from loom.models import Event, Item, ItemStatus, Job, JobStatus, Output, utcnow
from loom.storage import Store, results_key

log = logging.getLogger(__name__)


def maybe_finalize(
    session: Session,
    *,
    job_id: str,
    store: Store | None = None,
    on_finalized: Callable[[Job], None] | None = None,
    now: datetime | None = None,
) -> bool:
    """Finalise the job if it has no open items. True only for the one caller that did it."""
    return job_id in finalize_jobs(session, job_ids=[job_id], store=store,
                                   on_finalized=on_finalized, now=now)


def finalize_jobs(
    session: Session,
    *,
    job_ids: Collection[str],
    store: Store | None = None,
    on_finalized: Callable[[Job], None] | None = None,
    now: datetime | None = None,
    drained: bool = False,
) -> list[str]:
    """``maybe_finalize`` for several jobs in a handful of statements, not a dozen per job (a
    batch filled from many small jobs drains several at once). Returns the jobs this call
    finalised; each job is finalised by exactly one caller, as with ``maybe_finalize``.
    ``drained``: the caller has just seen these jobs without open items (claims_pg.complete),
    so the lock-free first look is skipped; the check under the job row lock still decides."""
    now = now or utcnow()
    ids = sorted(set(job_ids))
    if not ids:
        return []
    if not drained:
        # Fast path without locks: most calls (every completed batch) find open items.
        busy = set(session.scalars(
            select(Item.job_id).where(Item.job_id.in_(ids), OPEN_ITEM_PHASE)
            .distinct()))
        ids = [i for i in ids if i not in busy]
        session.commit()
        if not ids:
            return []
    begin_write(session)
    # Lock the job rows first (PostgreSQL; in id order, so two finalisers cannot deadlock), then
    # look at the items in a new statement: a concurrent retry_failed or cancel_job holds its
    # job's lock until it commits, so its changes are visible here instead of being missed by a
    # snapshot taken before it committed.
    locked = session.scalars(
        select(Job.id).where(Job.id.in_(ids), Job.status.in_(OPEN_JOB)).order_by(Job.id)
        .with_for_update()
    ).all()
    if not locked:
        session.rollback()
        return []
    no_open_items = ~exists().where(Item.job_id == Job.id, OPEN_ITEM_PHASE)
    won = session.scalars(
        update(Job)
        .where(Job.id.in_(locked), Job.status.in_(OPEN_JOB), no_open_items)
        .values(status=JobStatus.finalizing.value, updated_at=now)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).all()
    if not won:
        session.rollback()
        return []  # open items remain: whoever closes the last one finalises
    session.commit()
    return complete_finalizations(session, job_ids=won, store=store, on_finalized=on_finalized,
                                  now=now)


def _final_status(counts: dict[str, int], *, cancel_requested: bool) -> str:
    if cancel_requested or counts.get(ItemStatus.cancelled.value, 0):
        return JobStatus.cancelled.value
    if not counts.get(ItemStatus.failed.value, 0):
        return JobStatus.succeeded.value
    if not counts.get(ItemStatus.succeeded.value, 0):
        return JobStatus.failed.value
    return JobStatus.completed_with_errors.value


# Bytes per chunk handed to the store while streaming the manifest.
_MANIFEST_CHUNK = 256 * 1024
# Jobs finalised together whose items add up to at most this many share one manifest read.
_SHARED_MANIFEST_ROWS = 1000


_MANIFEST_COLUMNS = (Item.index, Item.id, Item.status, Item.error_code, Item.error_message,
                     Item.item_metadata, Output.text, Output.storage_key, Output.content_type,
                     Output.sha256)


def _manifest_rows(session: Session, *, job_id: str, page_size: int) -> Iterator[Any]:
    """The job's manifest rows in index order, one keyset page of plain rows at a time."""
    query = (select(*_MANIFEST_COLUMNS).outerjoin(Output, Output.item_id == Item.id)
             .where(Item.job_id == job_id).order_by(Item.index).limit(page_size))
    after = -1
    while True:
        rows = session.execute(query.where(Item.index > after)).all()
        yield from rows
        if len(rows) < page_size:
            return
        after = rows[-1].index


def _shared_manifest_rows(session: Session, jobs: Sequence[Job]) -> dict[str, list[Any]]:
    """The manifest rows of small jobs finalised together (a filled batch drains several at
    once), in one read instead of one per job; at most ``_SHARED_MANIFEST_ROWS`` rows."""
    ids: list[str] = []
    total = 0
    for job in jobs:
        if total + job.item_count > _SHARED_MANIFEST_ROWS:
            continue
        ids.append(job.id)
        total += job.item_count
    if len(ids) < 2:
        return {}
    rows: dict[str, list[Any]] = {i: [] for i in ids}
    for r in session.execute(
        select(Item.job_id, *_MANIFEST_COLUMNS).outerjoin(Output, Output.item_id == Item.id)
        .where(Item.job_id.in_(ids)).order_by(Item.job_id, Item.index)
    ):
        rows[r.job_id].append(r)
    return rows


def _manifest_bytes(rows: Iterable[Any]) -> Iterator[bytes]:
    """results.jsonl as byte chunks of about _MANIFEST_CHUNK: one line per row."""
    succeeded = ItemStatus.succeeded.value
    buf: list[str] = []
    size = 0
    for r in rows:
        failed = r.status != succeeded
        line = _manifest_dumps({
            "index": r.index,
            "item_id": r.id,
            "status": r.status,
            "text": r.text,
            "output_key": r.storage_key,
            "content_type": r.content_type,
            "sha256": r.sha256,
            "error_code": r.error_code if failed else None,
            "error_message": r.error_message if failed else None,
            "metadata": r.item_metadata,
        }) + "\n"
        buf.append(line)
        size += len(line)
        if size >= _MANIFEST_CHUNK:
            yield "".join(buf).encode()
            buf.clear()
            size = 0
    if buf:
        yield "".join(buf).encode()


def manifest_chunks(session: Session, *, job_id: str, page_size: int = 1000) -> Iterator[bytes]:
    """results.jsonl as byte chunks: one line per item in index order, read one keyset page of
    plain rows at a time (no ORM objects), so a 1,000,000-item manifest never sits in memory."""
    return _manifest_bytes(_manifest_rows(session, job_id=job_id, page_size=page_size))


_manifest_dumps = json.JSONEncoder(separators=(",", ":")).encode


def write_manifest(session: Session, *, job: Job, store: Store,
                   rows: Iterable[Any] | None = None) -> str:
    """Stream results.jsonl into the store (multipart on S3, temp file + rename locally).
    ``rows``: the manifest rows when the caller read them already. Returns its storage key."""
    key = results_key(job.tenant_id, job.id, "jsonl")
    chunks = (_manifest_bytes(rows) if rows is not None
              else manifest_chunks(session, job_id=job.id))
    store.put_chunks(key, chunks, "application/x-ndjson")
    return key


def complete_finalization(
    session: Session,
    *,
    job_id: str,
    store: Store | None = None,
    on_finalized: Callable[[Job], None] | None = None,
    now: datetime | None = None,
) -> bool:
    """Second half of finalisation for a job in ``finalizing`` (also used by the reconciler when a
    finaliser died halfway): manifest, terminal status and the webhook's delivery row, then the callback after commit."""
    return job_id in complete_finalizations(session, job_ids=[job_id], store=store,
                                            on_finalized=on_finalized, now=now)


def complete_finalizations(
    session: Session,
    *,
    job_ids: Collection[str],
    store: Store | None = None,
    on_finalized: Callable[[Job], None] | None = None,
    now: datetime | None = None,
) -> list[str]:
    """``complete_finalization`` for several jobs: one manifest per job, the reads and writes
    around them shared. A job whose manifest cannot be written (store down) stays
    ``finalizing`` for the reconciler; the others go on. Returns the jobs it finalised."""
    now = now or utcnow()
    finalizing = JobStatus.finalizing.value
    found = session.scalars(
        select(Job).where(Job.id.in_(sorted(set(job_ids))), Job.status == finalizing)
        .order_by(Job.id).execution_options(populate_existing=True)
    ).all()
    if not found:
        session.rollback()
        return []
    ids = [j.id for j in found]
    counts: dict[str, dict[str, int]] = {i: {} for i in ids}
    for job_id, status, n in session.execute(
        select(Item.job_id, Item.status, func.count()).where(Item.job_id.in_(ids))
        .group_by(Item.job_id, Item.status)
    ):
        counts[job_id][status] = n
    keys: dict[str, str | None] = {}
    shared = _shared_manifest_rows(session, found) if store is not None else {}
    for job in found:
        if store is None:
            keys[job.id] = None
            continue
        try:
            keys[job.id] = write_manifest(session, job=job, store=store, rows=shared.get(job.id))
        except LoomError as exc:
            # Stay in "finalizing": the reconciler retries once the store is back.
            log.warning("job %s: could not write results manifest: %s", job.id, exc.message)
    if not keys:
        session.rollback()
        return []
    # cancel_job records a job-level "cancelled" event; the job may have been cancelled even if
    # every remaining item then finished (they were already running).
    cancel_requested = set(session.scalars(
        select(Event.job_id).where(Event.job_id.in_(list(keys)), Event.kind == "cancelled",
                                   Event.item_id.is_(None))))
    final = {i: _final_status(counts[i], cancel_requested=i in cancel_requested) for i in keys}
    session.commit()  # end the read transaction before taking the write lock

    begin_write(session)
    done = session.scalars(
        update(Job)
        .where(Job.id.in_(list(final)), Job.status == finalizing)
        .values(status=case(final, value=Job.id), results_key=case(keys, value=Job.id),
                finished_at=now, updated_at=now)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).all()
    if not done:
        session.rollback()
        return []
    add_events(session, [{"job_id": i, "kind": "finalized", "message": final[i],
                          "created_at": now} for i in sorted(done)])
    finished = session.scalars(
        select(Job).where(Job.id.in_(done)).order_by(Job.id)
        .execution_options(populate_existing=True)
    ).all()
    # The webhook is a delivery row written with the terminal status, so it is never lost;
    # sending it is the caller's (loom.webhooks.send_due), never this state change's.
    for job in (j for j in finished if wants(j, "completed")):
        enqueue_delivery(session, job=job, event="completed",
                         payload=completed_payload(job, counts[job.id]), now=now)
    session.commit()
    if on_finalized is not None:
        for job in finished:
            try:
                on_finalized(job)
            except Exception:  # best effort, like the webhook: the job is final either way
                log.exception("job %s: on_finalized callback failed", job.id)
    return [job.id for job in finished]
