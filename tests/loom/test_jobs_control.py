"""Finalisation, cancel and retry-failed, on SQLite and PostgreSQL (db_url)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from jobs_helpers import claim, events, ok, statuses
from sqlalchemy.orm import Session, sessionmaker

from loom import jobs, webhooks
from loom.errors import (
    InvalidInput,
    InvalidState,
    ModelError,
)
from loom.jobs import Chunk, ItemFailure
from loom.models import Item, Job
from loom.storage import LocalStore


def test_finalize_writes_manifest_and_never_posts_a_webhook_to_loopback(
    session: Session, make_job: Callable[..., Job], tmp_path: Path
) -> None:
    received: list[dict[str, Any]] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        store = LocalStore(tmp_path / "store")
        job = make_job(3, webhook_url=f"http://127.0.0.1:{server.server_port}/hook")
        a, b, c = claim(session, job, "w")
        finalized: list[Job] = []
        jobs.complete_items(session, worker_id="w", results=[ok(a, "one"), ok(c, "three")],
                            store=store, on_finalized=finalized.append)
        assert finalized == []
        jobs.fail_items(session, worker_id="w", backoff_seconds=0, store=store,
                        on_finalized=finalized.append,
                        failures=[ItemFailure(b.id, InvalidInput("broken png"))])
        # Finalisation wrote the message and sent nothing; the sender is the caller's.
        [delivery] = jobs.job_deliveries(session, job_id=job.id)
        assert delivery["status"] == "pending" and received == []
        webhooks.send_due(session, job_ids=[job.id])
    finally:
        server.shutdown()
        server.server_close()
    assert len(finalized) == 1 and finalized[0].status == "completed_with_errors"
    final = jobs.get_job(session, job_id=job.id)
    assert final.results_key == f"{job.tenant_id}/jobs/{job.id}/results.jsonl"
    assert final.finished_at is not None
    rows = [json.loads(line) for line in store.get(final.results_key).decode().splitlines()]
    assert [(r["index"], r["status"], r["text"], r["error_code"]) for r in rows] == [
        (0, "succeeded", "one", None), (1, "failed", None, "invalid_input"),
        (2, "succeeded", "three", None)]
    assert rows[1]["error_message"] == "broken png" and rows[0]["metadata"] == {"file": "0.png"}
    # A loopback webhook is refused by the SSRF guard at send time (tests/loom/
    # test_webhook_delivery.py delivers to an allow-listed receiver and checks the body).
    assert received == []
    [delivery] = jobs.job_deliveries(session, job_id=job.id)
    assert delivery["event"] == "job.completed" and delivery["status"] == "failed"
    assert "loopback" in (delivery["last_error"] or "")
    assert events(session, job, "finalized") == 1


def test_finalize_exactly_one_winner_under_concurrent_completions(
    session_factory: sessionmaker[Session], session: Session, make_job: Callable[..., Job]
) -> None:
    n_workers = 6
    job = make_job(n_workers * 3)
    claims = [claim(session, job, f"w{i}", limit=3) for i in range(n_workers)]
    winners: list[str] = []
    barrier = threading.Barrier(n_workers)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with session_factory() as s:
                barrier.wait()
                jobs.complete_items(s, worker_id=f"w{i}", results=[ok(c) for c in claims[i]],
                                    on_finalized=lambda j: winners.append(j.id))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert winners == [job.id]
    assert jobs.get_job(session, job_id=job.id).status == "succeeded"
    assert events(session, job, "finalized") == 1
    # Later calls find nothing to do.
    assert jobs.maybe_finalize(session, job_id=job.id) is False


def test_cancel_queued_at_once_running_via_worker(
    session: Session, make_job: Callable[..., Job]
) -> None:
    job = make_job(6)
    running = claim(session, job, "w1", limit=2)
    cancelled = jobs.cancel_job(session, job_id=job.id)
    assert cancelled.status == "cancelling"
    assert statuses(session, job) == ["running"] * 2 + ["cancelled"] * 4
    assert claim(session, job, "w2") == []
    assert jobs.cancel_job(session, job_id=job.id).status == "cancelling"  # idempotent
    # The worker finishes one item, then notices the cancel and cancels the rest.
    assert jobs.complete_items(session, worker_id="w1", results=[ok(running[0])]) == 1
    assert jobs.cancel_remaining(session, job_id=job.id, worker_id="w1") == 1
    assert jobs.get_job(session, job_id=job.id).status == "cancelled"
    with pytest.raises(InvalidState):
        jobs.retry_failed(session, job_id=job.id)

    idle = make_job(3)
    assert jobs.cancel_job(session, job_id=idle.id).status == "cancelled"
    done = make_job(1)
    (c,) = claim(session, done, "w")
    jobs.complete_items(session, worker_id="w", results=[ok(c)])
    with pytest.raises(InvalidState):
        jobs.cancel_job(session, job_id=done.id)


def test_cancel_remaining_is_a_no_op_for_a_live_job(
    session: Session, make_job: Callable[..., Job]
) -> None:
    job = make_job(2)
    claim(session, job, "w1")
    assert jobs.cancel_remaining(session, job_id=job.id, worker_id="w1") == 0
    assert statuses(session, job) == ["running", "running"]


def test_retry_failed_requeues_and_republishes_only_affected_chunks(
    session: Session, make_job: Callable[..., Job]
) -> None:
    job = make_job(8, chunk_size=4, max_attempts=1)
    jobs.publish_pending(session, publish=lambda c: None)
    cs = claim(session, job, "w")
    jobs.complete_items(session, worker_id="w", results=[ok(c) for c in cs if c.index != 5])
    jobs.fail_items(session, worker_id="w", backoff_seconds=0,
                    failures=[ItemFailure(cs[5].id, ModelError("boom"))])
    assert jobs.get_job(session, job_id=job.id).status == "completed_with_errors"

    assert jobs.retry_failed(session, job_id=job.id) == 1
    again = jobs.get_job(session, job_id=job.id)
    assert again.status == "running" and again.finished_at is None
    item = session.get(Item, cs[5].id, populate_existing=True)
    assert item is not None
    # Fresh attempts (none spent), but the attempt number goes on (monotonic for the fence).
    assert (item.status, item.attempts, item.attempts_excused, item.error_code) == (
        "queued", 1, 1, None)
    sent: list[Chunk] = []
    assert jobs.publish_pending(session, publish=sent.append) == 1
    assert sent == [Chunk(job.id, 4, 8, 0)]
    assert jobs.retry_failed(session, job_id=job.id) == 0
    (c,) = claim(session, job, "w2")
    jobs.complete_items(session, worker_id="w2", results=[ok(c)])
    assert jobs.get_job(session, job_id=job.id).status == "succeeded"
