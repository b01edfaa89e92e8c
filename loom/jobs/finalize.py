"""Finalisation: exactly one caller moves a finished job to its terminal status.

The winner is decided by a conditional UPDATE (``status IN open states AND no open items``);
every completer calls ``maybe_finalize`` after committing its own work, so the last committer
always sees "no open items", and the row lock on the job row lets only one UPDATE succeed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import exists, func, select, update
from sqlalchemy.orm import Session

from loom import webhooks
from loom.db import begin_write
from loom.errors import LoomError
from loom.fetch import WEBHOOK_POLICY, AddressPolicy, Resolver, post_json
from loom.jobs.types import OPEN_ITEM, OPEN_JOB, JobProgress, add_events
from loom.jobs.views import job_dict
from loom.models import ITEM_TERMINAL, Event, Item, ItemStatus, Job, JobStatus, Output, utcnow
from loom.storage import Store, results_key

log = logging.getLogger(__name__)

WEBHOOK_TIMEOUT_SECONDS = 5.0


def maybe_finalize(
    session: Session,
    *,
    job_id: str,
    store: Store | None = None,
    on_finalized: Callable[[Job], None] | None = None,
    now: datetime | None = None,
) -> bool:
    """Finalise the job if it has no open items. True only for the one caller that did it."""
    now = now or utcnow()
    no_open_items = ~exists().where(Item.job_id == job_id, Item.status.in_(OPEN_ITEM))
    # Fast path without locks: most calls (every completed batch) find open items.
    if not session.scalar(select(no_open_items)):
        session.commit()
        return False
    begin_write(session)
    # Lock the job row first (PostgreSQL), then look at the items in a new statement: a
    # concurrent retry_failed or cancel_job holds this lock until it commits, so its changes are
    # visible here instead of being missed by a snapshot taken before it committed.
    status = session.scalar(select(Job.status).where(Job.id == job_id).with_for_update())
    if status not in OPEN_JOB:
        session.rollback()
        return False
    won = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == status, no_open_items)
        .values(status=JobStatus.finalizing.value, updated_at=now)
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    if won != 1:
        session.rollback()
        return False  # open items remain: whoever closes the last one finalises
    session.commit()
    return complete_finalization(session, job_id=job_id, store=store,
                                 on_finalized=on_finalized, now=now)


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


def manifest_chunks(session: Session, *, job_id: str, page_size: int = 1000) -> Iterator[bytes]:
    """results.jsonl as byte chunks: one line per item in index order, read one keyset page of
    plain rows at a time (no ORM objects), so a 1,000,000-item manifest never sits in memory."""
    succeeded = ItemStatus.succeeded.value
    query = (
        select(Item.index, Item.id, Item.status, Item.error_code, Item.error_message,
               Item.item_metadata, Output.text, Output.storage_key, Output.content_type,
               Output.sha256)
        .outerjoin(Output, Output.item_id == Item.id)
        .where(Item.job_id == job_id)
        .order_by(Item.index)
        .limit(page_size)
    )
    buf: list[str] = []
    size = 0
    after = -1
    while True:
        rows = session.execute(query.where(Item.index > after)).all()
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
        if len(rows) < page_size:
            break
        after = rows[-1].index
    if buf:
        yield "".join(buf).encode()


_manifest_dumps = json.JSONEncoder(separators=(",", ":")).encode


def write_manifest(session: Session, *, job: Job, store: Store) -> str:
    """Stream results.jsonl into the store (multipart on S3, temp file + rename locally).
    Returns its storage key."""
    key = results_key(job.tenant_id, job.id, "jsonl")
    store.put_chunks(key, manifest_chunks(session, job_id=job.id), "application/x-ndjson")
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
    finaliser died halfway): manifest, terminal status, then webhook and callback after commit."""
    now = now or utcnow()
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.status != JobStatus.finalizing.value:
        session.rollback()
        return False
    counts: dict[str, int] = {
        status: n
        for status, n in session.execute(
            select(Item.status, func.count()).where(Item.job_id == job_id).group_by(Item.status)
        )
    }
    key: str | None = None
    if store is not None:
        try:
            key = write_manifest(session, job=job, store=store)
        except LoomError as exc:
            # Stay in "finalizing": the reconciler retries once the store is back.
            log.warning("job %s: could not write results manifest: %s", job_id, exc.message)
            session.rollback()
            return False
    # cancel_job records a job-level "cancelled" event; the job may have been cancelled even if
    # every remaining item then finished (they were already running).
    cancel_requested = session.scalar(
        select(exists().where(Event.job_id == job_id, Event.kind == "cancelled",
                              Event.item_id.is_(None)))
    )
    final = _final_status(counts, cancel_requested=bool(cancel_requested))
    session.commit()  # end the read transaction before taking the write lock

    begin_write(session)
    done = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.finalizing.value)
        .values(status=final, results_key=key, finished_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    if done != 1:
        session.rollback()
        return False
    add_events(session, [{"job_id": job_id, "kind": "finalized", "message": final,
                          "created_at": now}])
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    # The webhook is a delivery row written with the terminal status (never lost), sent once now
    # and retried by the reconciler (loom.webhooks: signed, SSRF-guarded at every hop).
    queued = webhooks.enqueue(session, job=job, event="completed",
                              payload=webhook_payload(job, counts), now=now)
    session.commit()
    if queued:
        try:
            webhooks.deliver_due(session, job_id=job_id)
        except Exception:  # best effort here; the reconciler retries
            log.exception("job %s: webhook delivery failed", job_id)
    if on_finalized is not None:
        try:
            on_finalized(job)
        except Exception:  # best effort, like the webhook: the job is final either way
            log.exception("job %s: on_finalized callback failed", job_id)
    return True


def webhook_payload(job: Job, counts: dict[str, int]) -> dict[str, Any]:
    """``{"event": "job.finished", "job_id", ...the job as jobs.job_dict shows it}``, JSON-ready
    (timestamps ISO 8601 UTC)."""
    done = sum(n for s, n in counts.items() if s in {t.value for t in ITEM_TERMINAL})
    progress = JobProgress(job_id=job.id, status=job.status, total=job.item_count,
                           counts=counts, done=done, items_per_second=None, eta_seconds=None)
    body = job_dict(job, progress)
    for key, value in body.items():
        if isinstance(value, datetime):
            body[key] = value.isoformat() + "Z"
    return {"event": "job.finished", "job_id": job.id, **body}


def fire_webhook(job: Job, counts: dict[str, int],
                 timeout: float = WEBHOOK_TIMEOUT_SECONDS, *,
                 policy: AddressPolicy = WEBHOOK_POLICY,
                 resolver: Resolver | None = None) -> bool:
    """POST the job summary to its webhook; best effort (after commit, errors only logged).

    Through the SSRF guard (``loom.fetch``), like image URLs: the host is resolved and checked
    again now and at every redirect hop, and the connection goes to the checked address, so a
    URL that passed at submit cannot be re-pointed at loopback or a metadata address later."""
    assert job.webhook_url
    body = json.dumps(webhook_payload(job, counts), separators=(",", ":")).encode()
    try:
        status = post_json(job.webhook_url, body, timeout=timeout, policy=policy,
                           resolver=resolver)
    except LoomError as exc:
        log.warning("job %s: webhook not sent or failed: %s", job.id, exc.message)
        return False
    if status >= 400:
        log.warning("job %s: webhook answered %s", job.id, status)
        return False
    return True
