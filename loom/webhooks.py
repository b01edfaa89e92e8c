"""Webhooks worth trusting: signed (Standard Webhooks), persisted, retried with backoff, and sent
through the SSRF guard of ``loom.fetch`` at every redirect hop.

Events (a job's ``webhook_events`` filter; None means ``["completed"]``): ``started`` (the job's
first item was claimed), ``progress`` (at most one per ``PROGRESS_EVERY_SECONDS`` while running),
``completed`` (the job reached a terminal status). Each message is a row in ``deliveries`` with
the exact JSON body, so a worker restart loses nothing: ``tick`` (called by every worker's
reconciler) enqueues started/progress messages and delivers those that are due.

Signing (https://www.standardwebhooks.com): headers ``webhook-id`` (the message id, stable across
retries), ``webhook-timestamp`` (Unix seconds of this attempt) and ``webhook-signature`` =
``"v1," + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}"))``, where ``key`` is the
base64-decoded part of the tenant's secret after ``whsec_``. ``verify`` is the receiver's side.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from loom.db import begin_write
from loom.errors import BlockedUrl, InvalidInput, LoomError
from loom.fetch import WEBHOOK_POLICY, AddressPolicy, Resolver, open_guarded
from loom.models import Delivery, Job, JobStatus, Tenant, new_id, utcnow

log = logging.getLogger(__name__)

EVENTS = ("started", "progress", "completed")
DEFAULT_EVENTS = ("completed",)
MAX_ATTEMPTS = 8
BACKOFF_BASE_SECONDS = 5.0
BACKOFF_MAX_SECONDS = 3600.0
CLAIM_SECONDS = 60.0  # a claimed delivery is not picked up by another reconciler this long
PROGRESS_EVERY_SECONDS = 30.0
TIMEOUT_SECONDS = 5.0
# Webhooks are POSTs the server makes on its own: never loopback, private or metadata addresses,
# whatever LOOM_ALLOW_PRIVATE_URLS says for inputs (loom.fetch.WEBHOOK_POLICY).


# ------------------------------------------------------------------------------------------
# Secrets and signatures
# ------------------------------------------------------------------------------------------

def tenant_secret(session: Session, *, tenant_id: str) -> str:
    """The tenant's signing secret, created on first use (``whsec_`` + base64 of 24 bytes)."""
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        from loom.errors import NotFound

        raise NotFound(f"no tenant {tenant_id!r}")
    if tenant.webhook_secret:
        return tenant.webhook_secret
    begin_write(session)
    candidate = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    session.execute(update(Tenant).where(Tenant.id == tenant_id, Tenant.webhook_secret.is_(None))
                    .values(webhook_secret=candidate))
    session.commit()
    secret = session.scalar(select(Tenant.webhook_secret).where(Tenant.id == tenant_id))
    assert secret
    return secret


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def sign(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    mac = hmac.new(_key(secret), f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def signed_headers(secret: str, msg_id: str, body: str, *, timestamp: int | None = None,
                   ) -> dict[str, str]:
    ts = int(time.time()) if timestamp is None else timestamp
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts),
            "webhook-signature": sign(secret, msg_id, ts, body),
            "content-type": "application/json"}


def verify(secret: str, headers: dict[str, str], body: str, *, tolerance: int = 300) -> bool:
    """The receiver's check: a matching v1 signature and a timestamp within ``tolerance``."""
    h = {k.lower(): v for k, v in headers.items()}
    try:
        ts = int(h["webhook-timestamp"])
        expected = sign(secret, h["webhook-id"], ts, body)
    except (KeyError, ValueError):
        return False
    if abs(time.time() - ts) > tolerance:
        return False
    return any(hmac.compare_digest(expected, s) for s in h.get("webhook-signature", "").split())


# ------------------------------------------------------------------------------------------
# Enqueueing (rows only; the caller commits)
# ------------------------------------------------------------------------------------------

def wants(job: Job, event: str) -> bool:
    return bool(job.webhook_url) and event in (job.webhook_events or DEFAULT_EVENTS)


def iso(value: Any) -> Any:
    return value.isoformat() + "Z" if isinstance(value, datetime) else value


def enqueue(session: Session, *, job: Job, event: str, payload: dict[str, Any],
            now: datetime | None = None) -> str | None:
    """Add a delivery row for ``job`` if it subscribed to ``event``; returns its message id."""
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


def enqueue_running(session: Session, *, now: datetime | None = None,
                    progress_every: float = PROGRESS_EVERY_SECONDS) -> int:
    """started/progress messages for running jobs that asked for them (reconciler side)."""
    from loom.jobs import job_dict, job_progress

    now = now or utcnow()
    jobs = session.scalars(select(Job).where(
        Job.status == JobStatus.running.value, Job.webhook_url.is_not(None),
        Job.webhook_events.is_not(None))).all()
    added = 0
    for job in jobs:
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
            enqueue(session, job=job, event=event, payload={"event": f"job.{event}", **body},
                    now=now)
            session.commit()
            added += 1
    session.commit()
    return added


# ------------------------------------------------------------------------------------------
# Delivery
# ------------------------------------------------------------------------------------------

def post_guarded(url: str, body: bytes, headers: dict[str, str], *, policy: AddressPolicy,
                 timeout: float, resolver: Resolver | None = None) -> int:
    """POST through the same SSRF guard as image_url (loom.fetch.open_guarded): every hop
    resolved and checked by ``policy``, the connection pinned to the checked address. Returns
    the final status."""
    with open_guarded("POST", url, policy=policy, timeout=timeout, resolver=resolver,
                      content=body, headers={"Content-Type": "application/json", **headers}
                      ) as (response, _, _deadline):
        return response.status_code


def backoff(attempts: int) -> float:
    return min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2 ** max(0, attempts - 1))


def _claim(session: Session, *, now: datetime, job_id: str | None, limit: int) -> list[int]:
    """Due pending deliveries this caller now owns (a conditional UPDATE per row is the claim)."""
    due = select(Delivery.id).where(Delivery.status == "pending",
                                    Delivery.next_attempt_at <= now)
    if job_id is not None:
        due = due.where(Delivery.job_id == job_id)
    ids = list(session.scalars(due.order_by(Delivery.next_attempt_at).limit(limit)))
    session.commit()
    owned: list[int] = []
    for delivery_id in ids:
        begin_write(session)
        won = session.execute(
            update(Delivery)
            .where(Delivery.id == delivery_id, Delivery.status == "pending",
                   Delivery.next_attempt_at <= now)
            .values(next_attempt_at=now + timedelta(seconds=CLAIM_SECONDS),
                    attempts=Delivery.attempts + 1, updated_at=now)
            .execution_options(synchronize_session=False)).rowcount  # type: ignore[attr-defined]
        session.commit()
        if won == 1:
            owned.append(delivery_id)
    return owned


def deliver_due(session: Session, *, now: datetime | None = None, job_id: str | None = None,
                policy: AddressPolicy = WEBHOOK_POLICY, timeout: float = TIMEOUT_SECONDS,
                resolver: Resolver | None = None, limit: int = 50) -> int:
    """Send the due deliveries (no transaction is held while sending); returns how many
    were delivered. Failures are rescheduled with exponential backoff, up to MAX_ATTEMPTS;
    a URL the SSRF guard refuses fails at once."""
    now = now or utcnow()
    delivered = 0
    for delivery_id in _claim(session, now=now, job_id=job_id, limit=limit):
        d = session.get(Delivery, delivery_id, populate_existing=True)
        assert d is not None
        secret = tenant_secret(session, tenant_id=d.tenant_id)
        url, msg_id, body, attempts = d.url, d.msg_id, d.body, d.attempts
        session.commit()
        code: int | None = None
        error: str | None = None
        final = False
        try:
            code = post_guarded(url, body.encode(), signed_headers(secret, msg_id, body),
                                policy=policy, timeout=timeout, resolver=resolver)
            if not 200 <= code < 300:
                error = f"HTTP {code}"
        except (BlockedUrl, InvalidInput) as exc:
            error, final = exc.message, True
        except LoomError as exc:
            error = exc.message
        except Exception as exc:  # httpx errors: connection refused, timeouts, ...
            error = f"{type(exc).__name__}: {exc}"
        if error is None:
            status, next_at = "delivered", None
            delivered += 1
        elif final or attempts >= MAX_ATTEMPTS:
            status, next_at = "failed", None
            log.warning("webhook %s for job %s failed for good: %s", msg_id, d.job_id, error)
        else:
            status, next_at = "pending", now + timedelta(seconds=backoff(attempts))
        begin_write(session)
        session.execute(update(Delivery).where(Delivery.id == delivery_id).values(
            status=status, next_attempt_at=next_at, last_status_code=code,
            last_error=error[:500] if error else None, updated_at=utcnow()))
        session.commit()
    return delivered


def tick(session: Session, *, now: datetime | None = None,
         policy: AddressPolicy = WEBHOOK_POLICY) -> int:
    """The reconciler's webhook work: enqueue started/progress, deliver what is due."""
    enqueue_running(session, now=now)
    return deliver_due(session, now=now, policy=policy)


def deliveries_for_job(session: Session, *, job_id: str) -> list[dict[str, Any]]:
    rows = session.scalars(select(Delivery).where(Delivery.job_id == job_id)
                           .order_by(Delivery.id.desc()).limit(50)).all()
    session.commit()
    return [{"id": d.msg_id, "event": d.event, "status": d.status, "attempts": d.attempts,
             "last_status_code": d.last_status_code, "last_error": d.last_error,
             "next_attempt_at": d.next_attempt_at, "created_at": d.created_at} for d in rows]
