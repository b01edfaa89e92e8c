"""Webhooks worth trusting: signed (Standard Webhooks), sent through the SSRF guard of
``loom.fetch`` at every redirect hop, and never from inside a job's state change.

The rows are ``loom.jobs``' (``loom/jobs/deliveries.py``): a job's terminal transaction writes
its ``job.completed`` message, so nothing is lost when a sender dies. This module only sends what
is due: ``send_due`` claims due rows, POSTs each one signed, and records the attempt. The senders
are the worker (after a batch finalised jobs, off its finisher thread), the API (after a cancel
finalised a job), and every worker's reconciler (``tick``: started/progress messages, retries
with backoff).

Signing (https://www.standardwebhooks.com): headers ``webhook-id`` (the message id, stable across
retries), ``webhook-timestamp`` (Unix seconds of this attempt) and ``webhook-signature`` =
``"v1," + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}"))``, where ``key`` is the
base64-decoded part of the tenant's secret after ``whsec_``. ``verify`` is the receiver's side.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
from collections.abc import Collection
from datetime import datetime
from typing import TYPE_CHECKING

from loom import jobs
from loom.errors import BlockedUrl, InvalidInput, LoomError
from loom.fetch import WEBHOOK_POLICY, AddressPolicy, Resolver, open_guarded

if TYPE_CHECKING:  # pragma: no cover
    from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 5.0
# Webhooks are POSTs the server makes on its own: never loopback, private or metadata addresses,
# whatever LOOM_ALLOW_PRIVATE_URLS says for inputs (loom.fetch.WEBHOOK_POLICY).


# ------------------------------------------------------------------------------------------
# Signatures
# ------------------------------------------------------------------------------------------

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
# Sending
# ------------------------------------------------------------------------------------------

def post_guarded(url: str, body: bytes, headers: dict[str, str], *, policy: AddressPolicy,
                 timeout: float, resolver: Resolver | None = None) -> int:
    """POST through the same SSRF guard as image_url (loom.fetch.open_guarded): every hop
    resolved and checked by ``policy``, the connection pinned to the checked address. Returns
    the final status; raises BlockedUrl / InvalidInput / FetchFailed like ``fetch_url``."""
    with open_guarded("POST", url, policy=policy, timeout=timeout, resolver=resolver,
                      content=body, headers={"Content-Type": "application/json", **headers}
                      ) as (response, _, _deadline):
        return response.status_code


def send_due(session: Session, *, now: datetime | None = None,
             job_ids: Collection[str] | None = None, policy: AddressPolicy = WEBHOOK_POLICY,
             timeout: float = TIMEOUT_SECONDS, resolver: Resolver | None = None,
             limit: int = 50) -> int:
    """Send the due deliveries (of ``job_ids`` when given); returns how many were delivered.
    No transaction is held while a POST is in flight. A URL the SSRF guard refuses fails at
    once; other failures are retried with backoff (``loom.jobs.record_delivery_attempt``)."""
    delivered = 0
    for due in jobs.claim_due_deliveries(session, now=now, job_ids=job_ids, limit=limit):
        code: int | None = None
        error: str | None = None
        final = False
        try:
            code = post_guarded(due.url, due.body.encode(),
                                signed_headers(due.secret, due.msg_id, due.body),
                                policy=policy, timeout=timeout, resolver=resolver)
            if not 200 <= code < 300:
                error = f"HTTP {code}"
        except (BlockedUrl, InvalidInput) as exc:
            error, final = exc.message, True
        except LoomError as exc:
            error = exc.message
        except Exception as exc:  # httpx errors: connection refused, timeouts, ...
            error = f"{type(exc).__name__}: {exc}"
        status = jobs.record_delivery_attempt(session, delivery=due, status_code=code,
                                              error=error, final=final, now=now)
        if status == "delivered":
            delivered += 1
        elif status == "failed":
            log.warning("webhook %s for job %s failed for good: %s", due.msg_id, due.job_id,
                        error)
    return delivered


def send_due_quietly(session: Session, *, job_ids: Collection[str],
                     policy: AddressPolicy = WEBHOOK_POLICY) -> None:
    """``send_due`` for jobs a caller has just finalised, best effort: whatever fails here is
    retried by the reconciler, so it is logged and never raised to the caller."""
    try:
        send_due(session, job_ids=job_ids, policy=policy)
    except Exception:
        log.exception("webhook delivery for jobs %s failed (the reconciler retries)",
                      sorted(job_ids))


def tick(session: Session, *, now: datetime | None = None,
         policy: AddressPolicy = WEBHOOK_POLICY) -> int:
    """The reconciler's webhook work: enqueue started/progress, send what is due."""
    jobs.enqueue_progress_deliveries(session, now=now)
    return send_due(session, now=now, policy=policy)
