"""Webhooks (loom.webhooks): Standard Webhooks signatures checked by a real receiver, retries with
backoff persisted in the deliveries table (a receiver that is down gets the event once it is
back, also from a fresh engine = a restarted worker), and the SSRF guard at send time and at
every redirect hop. On SQLite and PostgreSQL (db_url)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest
from jobs_helpers import claim, ok
from sqlalchemy.orm import Session, sessionmaker

from loom import jobs, tenants, webhooks
from loom.fetch import AddressPolicy
from loom.models import Delivery, Job, utcnow


class Receiver:
    """A webhook receiver on 127.0.0.1 that records (headers, body) of each POST."""

    def __init__(self, port: int = 0, redirect_to: str | None = None) -> None:
        received: list[tuple[dict[str, str], str]] = []
        self.received = received

        class Hook(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                if redirect_to:
                    self.send_response(307)
                    self.send_header("Location", redirect_to)
                    self.end_headers()
                    return
                received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", port), Hook)
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def allow(port: int) -> AddressPolicy:
    """The production policy refuses loopback; tests pin their own receiver's port through."""
    return AddressPolicy(allow=frozenset({("127.0.0.1", port)}))


def finish(session: Session, job: Job, texts: str = "x") -> None:
    items = claim(session, job, "w", limit=job.item_count)
    jobs.complete_items(session, worker_id="w", results=[ok(i, texts) for i in items])


def test_signed_delivery_verified_by_the_receiver(
    session: Session, make_job: Callable[..., Job], receiver: Receiver
) -> None:
    job = make_job(2, webhook_url=receiver.url)
    finish(session, job)  # finalisation writes the message and sends nothing
    [row] = jobs.job_deliveries(session, job_id=job.id)
    assert row["status"] == "pending" and row["attempts"] == 0 and row["last_error"] is None
    # The production policy refuses loopback: sent as is, the message fails for good.
    assert webhooks.send_due(session) == 0
    [row] = jobs.job_deliveries(session, job_id=job.id)
    assert row["status"] == "failed" and "loopback" in row["last_error"]
    # The same message again, to a receiver the policy lets through.
    session.query(Delivery).filter_by(job_id=job.id).update(
        {"status": "pending", "next_attempt_at": utcnow(), "attempts": 0})
    session.commit()
    assert webhooks.send_due(session, policy=allow(receiver.port)) == 1
    [(headers, body)] = receiver.received
    secret = tenants.webhook_secret(session, tenant_id=job.tenant_id)
    assert secret.startswith("whsec_")
    # The receiver's check, written out from the Standard Webhooks spec.
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.{body}".encode()
    mac = hmac.new(base64.b64decode(secret[len("whsec_"):]), signed, hashlib.sha256).digest()
    assert headers["webhook-signature"] == "v1," + base64.b64encode(mac).decode()
    assert webhooks.verify(secret, headers, body)
    assert not webhooks.verify(secret, headers, body.replace("succeeded", "failed"))
    payload = json.loads(body)
    assert payload["type"] == "job.completed" and payload["job_id"] == job.id
    assert payload["status"] == "succeeded" and payload["counts"]["succeeded"] == 2
    [row] = jobs.job_deliveries(session, job_id=job.id)
    assert row["status"] == "delivered" and row["last_status_code"] == 204


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_receiver_down_gets_retries_and_the_event_after_it_is_back(
    session: Session, session_factory: sessionmaker[Session], make_job: Callable[..., Job]
) -> None:
    port = _free_port()  # nothing listens yet
    url = f"http://127.0.0.1:{port}/hook"
    job = make_job(3, webhook_url=url, webhook_events=["started", "progress", "completed"])
    claim(session, job, "w", limit=1)  # the job is running now
    t0 = utcnow()
    assert jobs.enqueue_progress_deliveries(session, now=t0) == 2  # started + progress
    assert jobs.enqueue_progress_deliveries(session, now=t0 + timedelta(seconds=1)) == 0  # throttled
    assert webhooks.send_due(session, now=t0, policy=allow(port)) == 0
    rows = jobs.job_deliveries(session, job_id=job.id)
    assert {r["event"] for r in rows} == {"job.started", "job.progress"}
    assert all(r["status"] == "pending" and r["attempts"] == 1 and r["last_error"] for r in rows)
    # Backoff: not due again yet; the second failure doubles the wait.
    assert webhooks.send_due(session, now=t0 + timedelta(seconds=1), policy=allow(port)) == 0
    t1 = t0 + timedelta(seconds=jobs.delivery_backoff(1) + 1)
    assert webhooks.send_due(session, now=t1, policy=allow(port)) == 0
    rows = jobs.job_deliveries(session, job_id=job.id)
    assert all(r["attempts"] == 2 for r in rows)
    assert all(r["next_attempt_at"] >= t1 + timedelta(seconds=jobs.delivery_backoff(2)) for r in rows)
    # The receiver comes back; a fresh session (a restarted worker) finds the rows and sends them.
    back = Receiver(port)
    try:
        with session_factory() as fresh:
            t2 = t1 + timedelta(seconds=jobs.delivery_backoff(2) + 1)
            assert webhooks.send_due(fresh, now=t2, policy=allow(port)) == 2
    finally:
        back.close()
    assert sorted(json.loads(b)["type"] for _, b in back.received) == ["job.progress",
                                                                      "job.started"]
    secret = tenants.webhook_secret(session, tenant_id=job.tenant_id)
    assert all(webhooks.verify(secret, h, b) for h, b in back.received)
    assert {r["status"] for r in jobs.job_deliveries(session, job_id=job.id)} == {
        "delivered"}


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/hook", "http://169.254.169.254/latest",
                                 "http://[::1]:9/hook", "http://metadata.google.internal/x"])
def test_loopback_and_metadata_webhooks_are_refused(
    session: Session, make_job: Callable[..., Job], url: str
) -> None:
    job = make_job(1, webhook_url=url)
    finish(session, job)
    webhooks.send_due(session, job_ids=[job.id], timeout=2)
    [row] = jobs.job_deliveries(session, job_id=job.id)
    # Refused by the guard (never retried), or the name does not resolve here (retried later).
    assert row["last_status_code"] is None
    if "internal" not in url:
        assert row["status"] == "failed" and "refused" in row["last_error"], row


def test_redirect_to_a_loopback_address_is_refused_at_the_hop(
    session: Session, make_job: Callable[..., Job], receiver: Receiver
) -> None:
    # The first hop is allowed (pinned port); it redirects to another loopback port: refused.
    hop = Receiver(redirect_to=receiver.url)
    try:
        job = make_job(1, webhook_url=hop.url)
        finish(session, job)
        assert webhooks.send_due(session, policy=allow(hop.port)) == 0
    finally:
        hop.close()
    assert receiver.received == []
    [row] = jobs.job_deliveries(session, job_id=job.id)
    assert row["status"] == "failed" and "loopback" in row["last_error"]
