"""Webhook delivery rows: one row per message, written with the state change it reports.

The terminal transaction of a job writes its ``job.completed`` row (``finalize``); the
reconciler writes ``job.started``/``job.progress`` rows for running jobs that asked for them
(``enqueue_progress_deliveries``). Sending is not done here: ``loom.webhooks`` claims the due
rows (``claim_due_deliveries``), POSTs them signed, and records each attempt
(``record_delivery_attempt``), which reschedules a failure with exponential backoff up to
``MAX_ATTEMPTS``. No transaction is held while a message is in flight.

Events (a job's ``webhook_events`` filter; None means ``["completed"]``): ``started`` (the job's
first item was claimed), ``progress`` (at most one per ``PROGRESS_EVERY_SECONDS`` while running),
``completed`` (the job reached a terminal status).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from loom.db import begin_write
from loom.jobs.queries import job_progress
from loom.jobs.types import JobProgress
from loom.jobs.views import job_dict
from loom.models import ITEM_TERMINAL, Delivery, Job, JobStatus, new_id, utcnow
from loom.tenants import webhook_secret

EVENTS = ("started", "progress", "completed")
DEFAULT_EVENTS = ("completed",)
MAX_ATTEMPTS = 8
BACKOFF_BASE_SECONDS = 5.0
BACKOFF_MAX_SECONDS = 3600.0
CLAIM_SECONDS = 60.0  # a claimed delivery is not picked up by another sender this long
PROGRESS_EVERY_SECONDS = 30.0


@dataclass(frozen=True)
class DueDelivery:
    """A delivery its sender now owns for ``CLAIM_SECONDS``: what to POST, and how to sign it."""

    id: int
    msg_id: str
    job_id: str
    url: str
    body: str  # the exact JSON text that is signed and sent
    attempts: int  # including this one
    secret: str  # the tenant's signing secret


def wants(job: Job, event: str) -> bool:
    return bool(job.webhook_url) and event in (job.webhook_events or DEFAULT_EVENTS)


def iso(value: Any) -> Any:
    return value.isoformat() + "Z" if isinstance(value, datetime) else value


def delivery_backoff(attempts: int) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones."""
    return min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2 ** max(0, attempts - 1))


def completed_payload(job: Job, counts: dict[str, int]) -> dict[str, Any]:
    """``{"event": "job.finished", "job_id", ...the job as jobs.job_dict shows it}``, JSON-ready
    (timestamps ISO 8601 UTC)."""
    done = sum(n for s, n in counts.items() if s in {t.value for t in ITEM_TERMINAL})
    progress = JobProgress(job_id=job.id, status=job.status, total=job.item_count,
                           counts=counts, done=done, items_per_second=None, eta_seconds=None)
    body = {k: iso(v) for k, v in job_dict(job, progress).items()}
    return {"event": "job.finished", "job_id": job.id, **body}


def enqueue_delivery(session: Session, *, job: Job, event: str, payload: dict[str, Any],
                     now: datetime | None = None) -> str | None:
    """Add a delivery row for ``job`` if it subscribed to ``event`` (the caller commits, in the
    transaction of the change it reports); returns its message id."""
    if not wants(job, event):
        return None
    now = now or utcnow()
    msg_id = "msg_" + new_id()
    body = {"type": f"job.{event}", "timestamp": iso(now),
            **{k: iso(v) for k, v in payload.items()}}
    session.execute(insert(Delivery).values(
        msg_id=msg_id, tenant_id=job.tenant_id, job_id=job.id, event=f"job.{event}",
        url=job.webhook_url, body=json.dumps(body, separators=(",", ":"), default=str),
        status="pending", attempts=0, next_attempt_at=now, created_at=now, updated_at=now))
    return msg_id


def enqueue_progress_deliveries(session: Session, *, now: datetime | None = None,
                                progress_every: float = PROGRESS_EVERY_SECONDS) -> int:
    """started/progress rows for running jobs that asked for them (the reconciler's side)."""
    now = now or utcnow()
    running = session.scalars(select(Job).where(
        Job.status == JobStatus.running.value, Job.webhook_url.is_not(None),
        Job.webhook_events.is_not(None))).all()
    added = 0
    for job in running:
        for event in ("started", "progress"):
            if not wants(job, event):
                continue
            last = session.scalar(select(func.max(Delivery.created_at)).where(
                Delivery.job_id == job.id, Delivery.event == f"job.{event}"))
            if event == "started" and last is not None:
                continue
            if event == "progress" and last is not None and \
                    (now - last).total_seconds() < progress_every:
                continue
            body = job_dict(job, job_progress(session, job_id=job.id))
            begin_write(session)
            enqueue_delivery(session, job=job, event=event,
                             payload={"event": f"job.{event}", **body}, now=now)
            session.commit()
            added += 1
    session.commit()
    return added


def claim_due_deliveries(session: Session, *, now: datetime | None = None,
                         job_ids: Collection[str] | None = None,
                         limit: int = 50) -> list[DueDelivery]:
    """Due pending deliveries (of ``job_ids`` when given) that this caller now owns: a
    conditional UPDATE per row is the claim, and it counts the attempt."""
    now = now or utcnow()
    due = select(Delivery.id).where(Delivery.status == "pending",
                                    Delivery.next_attempt_at <= now)
    if job_ids is not None:
        if not job_ids:
            return []
        due = due.where(Delivery.job_id.in_(list(job_ids)))
    ids = list(session.scalars(due.order_by(Delivery.next_attempt_at).limit(limit)))
    session.commit()
    owned: list[DueDelivery] = []
    for delivery_id in ids:
        begin_write(session)
        row = session.execute(
            update(Delivery)
            .where(Delivery.id == delivery_id, Delivery.status == "pending",
                   Delivery.next_attempt_at <= now)
            .values(next_attempt_at=now + timedelta(seconds=CLAIM_SECONDS),
                    attempts=Delivery.attempts + 1, updated_at=now)
            .returning(Delivery.msg_id, Delivery.tenant_id, Delivery.job_id, Delivery.url,
                       Delivery.body, Delivery.attempts)
            .execution_options(synchronize_session=False)).one_or_none()
        session.commit()
        if row is not None:
            owned.append(DueDelivery(
                id=delivery_id, msg_id=row.msg_id, job_id=row.job_id, url=row.url,
                body=row.body, attempts=row.attempts,
                secret=webhook_secret(session, tenant_id=row.tenant_id)))
    return owned


def record_delivery_attempt(session: Session, *, delivery: DueDelivery, status_code: int | None,
                            error: str | None, final: bool = False,
                            now: datetime | None = None) -> str:
    """The outcome of one attempt: ``delivered``; ``pending`` again after a backoff; or
    ``failed`` for good (``final``: the URL is refused, or the attempts are spent). Returns
    the new status."""
    now = now or utcnow()
    if error is None:
        status, next_at = "delivered", None
    elif final or delivery.attempts >= MAX_ATTEMPTS:
        status, next_at = "failed", None
    else:
        status, next_at = "pending", now + timedelta(seconds=delivery_backoff(delivery.attempts))
    begin_write(session)
    session.execute(update(Delivery).where(Delivery.id == delivery.id).values(
        status=status, next_attempt_at=next_at, last_status_code=status_code,
        last_error=error[:500] if error else None, updated_at=utcnow()))
    session.commit()
    return status


def job_deliveries(session: Session, *, job_id: str, limit: int = 50) -> list[dict[str, Any]]:
    """The job's newest deliveries, newest first (the job page shows them)."""
    rows = session.scalars(select(Delivery).where(Delivery.job_id == job_id)
                           .order_by(Delivery.id.desc()).limit(limit)).all()
    session.commit()
    return [{"id": d.msg_id, "event": d.event, "status": d.status, "attempts": d.attempts,
             "last_status_code": d.last_status_code, "last_error": d.last_error,
             "next_attempt_at": d.next_attempt_at, "created_at": d.created_at} for d in rows]
