"""Submission, leases, fenced completion/failure, cancel, finalisation, retry and reconcile,
each on SQLite and PostgreSQL (the db_url fixture)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from loom import jobs, tenants
from loom.errors import (
    FetchFailed,
    IdempotencyConflict,
    InvalidInput,
    InvalidRequest,
    InvalidState,
    ModelError,
)
from loom.jobs import Chunk, ItemFailure, ItemResult
from loom.models import Event, Item, Job, Outbox, Output, utcnow
from loom.storage import LocalStore

LEASE = 60.0


def claim(session: Session, job: Job, worker: str, *, start: int = 0, end: int | None = None,
          limit: int = 100, now: Any = None) -> list[jobs.ClaimedItem]:
    return jobs.claim_items(session, job_id=job.id, start=start,
                            end=job.item_count if end is None else end, worker_id=worker,
                            limit=limit, lease_seconds=LEASE, now=now)


def ok(c: jobs.ClaimedItem, text: str = "a caption") -> ItemResult:
    return ItemResult(c.id, "text", text=text, model_version="1", weights_sha256="ab" * 32,
                      timings={"model": 0.01}, attempt=c.attempts)


def statuses(session: Session, job: Job) -> list[str]:
    session.commit()
    return list(session.scalars(select(Item.status).where(Item.job_id == job.id)
                                .order_by(Item.index)))


def events(session: Session, job: Job, kind: str) -> int:
    session.commit()
    return int(session.scalar(select(func.count()).where(Event.job_id == job.id,
                                                         Event.kind == kind)) or 0)


def test_submit_writes_job_items_and_one_outbox_row_per_chunk(
    session: Session, make_job: Callable[..., Job]
) -> None:
    job = make_job(10, chunk_size=4, params={"beam": 2}, metadata={"team": "x"})
    assert job.status == "queued" and job.item_count == 10
    items = session.scalars(select(Item).where(Item.job_id == job.id).order_by(Item.index)).all()
    assert [i.index for i in items] == list(range(10))
    assert items[3].input == {"image_key": "k/3.png"}
    assert items[3].item_metadata == {"file": "3.png"}
    assert {i.status for i in items} == {"queued"} and {i.attempts for i in items} == {0}
    chunks = session.execute(select(Outbox.chunk_start, Outbox.chunk_end, Outbox.published_at)
                             .where(Outbox.job_id == job.id).order_by(Outbox.chunk_start)).all()
    assert [(c[0], c[1]) for c in chunks] == [(0, 4), (4, 8), (8, 10)]
    assert all(c[2] is None for c in chunks)


def test_submit_validates_and_takes_a_chosen_job_id(
    session: Session, make_job: Callable[..., Job]
) -> None:
    with pytest.raises(InvalidRequest):
        make_job(0)
    with pytest.raises(InvalidRequest):
        make_job(2, task="paint")
    job = make_job(2, job_id="0123456789abcdef0123456789abcdef")
    assert job.id == "0123456789abcdef0123456789abcdef"


def test_idempotency_key(session: Session, make_job: Callable[..., Job]) -> None:
    first = make_job(3, idempotency_key="k1", request_hash="h1")
    again = make_job(3, idempotency_key="k1", request_hash="h1")
    assert again.id == first.id
    with pytest.raises(IdempotencyConflict):
        make_job(3, idempotency_key="k1", request_hash="other")
    # Without a request_hash the fingerprint of the request decides.
    a = make_job(3, idempotency_key="k2")
    assert make_job(3, idempotency_key="k2").id == a.id
    with pytest.raises(IdempotencyConflict):
        make_job(4, idempotency_key="k2")
    # Keys are per tenant.
    other = tenants.ensure_tenant(session, name="other")
    assert make_job(3, idempotency_key="k1", request_hash="h1", tenant_id=other.id).id != first.id
    assert session.scalar(select(func.count()).select_from(Job)) == 3


def test_publish_pending_publishes_once_and_records_partial_failures(
    session: Session, make_job: Callable[..., Job]
) -> None:
    job = make_job(10)
    sent: list[Chunk] = []

    def flaky(chunk: Chunk) -> None:
        if len(sent) == 2:
            raise ConnectionError("broker down")
        sent.append(chunk)

    with pytest.raises(ConnectionError):
        jobs.publish_pending(session, publish=flaky, job_id=job.id)
    assert [c.start for c in sent] == [0, 4]
    later: list[Chunk] = []
    assert jobs.publish_pending(session, publish=later.append) == 1  # only the unsent chunk
    assert later == [Chunk(job.id, 8, 10, 0)]
    assert jobs.publish_pending(session, publish=later.append) == 0


def test_claim_heartbeat_and_fenced_completion(
    session: Session, make_job: Callable[..., Job]
) -> None:
    job = make_job(6, chunk_size=6)
    t0 = utcnow()
    a = claim(session, job, "w1", limit=2, now=t0)
    assert [c.index for c in a] == [0, 1] and {c.attempts for c in a} == {1}
    assert a[0].task == "caption" and a[0].input == {"image_key": "k/0.png"}
    assert jobs.get_job(session, job_id=job.id).status == "running"
    b = claim(session, job, "w2", limit=10, now=t0)
    assert [c.index for c in b] == [2, 3, 4, 5]
    assert claim(session, job, "w3", now=t0) == []  # nothing left: all leases are live

    # Heartbeat extends only the caller's own leases.
    assert jobs.heartbeat(session, item_ids=[a[0].id, b[0].id], worker_id="w1",
                          lease_seconds=LEASE, now=t0 + timedelta(seconds=30)) == 1
    # w2's leases expire (w1's item 0 was extended, item 1 expires too); w3 takes them over.
    late = t0 + timedelta(seconds=LEASE + 1)
    c = claim(session, job, "w3", now=late)
    assert [x.index for x in c] == [1, 2, 3, 4, 5] and {x.attempts for x in c} == {2}
    assert events(session, job, "lease_expired") == 5

    # The workers that lost their leases cannot complete; the new owner can.
    assert jobs.complete_items(session, worker_id="w2", results=[ok(x) for x in b]) == 0
    assert jobs.complete_items(session, worker_id="w1", results=[ok(a[1])]) == 0
    assert jobs.complete_items(session, worker_id="w1", results=[ok(a[0])]) == 1
    assert jobs.complete_items(session, worker_id="w3", results=[ok(x) for x in c]) == 5
    assert jobs.complete_items(session, worker_id="w3", results=[ok(x) for x in c]) == 0
    out = session.scalar(select(Output).where(Output.item_id == c[0].id))
    assert out is not None and out.attempt == 2 and out.worker_id == "w3"
    assert out.task == "caption" and out.model_name == "loom-shapes"
    assert session.scalar(select(func.count()).where(Output.job_id == job.id)) == 6
    assert jobs.get_job(session, job_id=job.id).status == "succeeded"


def test_attempt_fence_rejects_a_stale_claim_by_the_same_worker_id(
    session: Session, make_job: Callable[..., Job]
) -> None:
    job = make_job(1)
    t0 = utcnow()
    (first,) = claim(session, job, "w1", now=t0)
    (second,) = claim(session, job, "w1", now=t0 + timedelta(seconds=LEASE + 1))
    assert second.attempts == 2
    assert jobs.complete_items(session, worker_id="w1", results=[ok(first)]) == 0
    assert jobs.complete_items(session, worker_id="w1", results=[ok(second)]) == 1


def test_fail_transient_backs_off_then_gives_up_permanent_fails_at_once(
    session: Session, make_job: Callable[..., Job]
) -> None:
    job = make_job(2, max_attempts=2)
    t0 = utcnow()
    x, y = claim(session, job, "w1", now=t0)
    assert jobs.fail_items(session, worker_id="w1", backoff_seconds=10, now=t0, failures=[
        ItemFailure(x.id, FetchFailed("timeout")), ItemFailure(y.id, InvalidInput("not an image")),
    ]) == 2
    assert statuses(session, job) == ["queued", "failed"]
    item_y = session.get(Item, y.id)
    assert item_y is not None
    assert (item_y.error_code, item_y.error_message) == ("invalid_input", "not an image")
    assert claim(session, job, "w1", now=t0 + timedelta(seconds=9)) == []  # backoff
    (x2,) = claim(session, job, "w2", now=t0 + timedelta(seconds=11))
    assert x2.attempts == 2
    assert jobs.fail_items(session, worker_id="w2", backoff_seconds=10, now=t0,
                           failures=[ItemFailure(x2.id, ModelError("cuda oom"))]) == 1
    item_x = session.get(Item, x.id, populate_existing=True)
    assert item_x is not None and item_x.status == "failed" and item_x.error_code == "model_error"
    assert "gave up after 2 attempts" in (item_x.error_message or "")
    assert claim(session, job, "w3", now=t0 + timedelta(days=1)) == []  # never again
    assert jobs.get_job(session, job_id=job.id).status == "failed"
    assert events(session, job, "retry_scheduled") == 1 and events(session, job, "failed") == 2


def test_backoff_grows_exponentially(session: Session, make_job: Callable[..., Job]) -> None:
    job = make_job(1, max_attempts=5)
    t = utcnow()
    for attempt, delay in [(1, 4), (2, 8), (3, 16)]:
        (c,) = claim(session, job, "w", now=t)
        assert c.attempts == attempt
        jobs.fail_items(session, worker_id="w", backoff_seconds=4, now=t,
                        failures=[ItemFailure(c.id, FetchFailed("x"))])
        item = session.get(Item, c.id, populate_existing=True)
        assert item is not None and item.available_at == t + timedelta(seconds=delay)
        t = item.available_at


def test_finalize_writes_manifest_and_fires_webhook(
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
    assert len(received) == 1
    assert received[0]["job_id"] == job.id and received[0]["status"] == "completed_with_errors"
    assert received[0]["counts"]["failed"] == 1
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
    assert (item.status, item.attempts, item.error_code) == ("queued", 0, None)
    sent: list[Chunk] = []
    assert jobs.publish_pending(session, publish=sent.append) == 1
    assert sent == [Chunk(job.id, 4, 8, 0)]
    assert jobs.retry_failed(session, job_id=job.id) == 0
    (c,) = claim(session, job, "w2")
    jobs.complete_items(session, worker_id="w2", results=[ok(c)])
    assert jobs.get_job(session, job_id=job.id).status == "succeeded"


def test_reconcile_publishes_outbox_left_by_a_crash_between_commit_and_publish(
    session: Session, make_job: Callable[..., Job]
) -> None:
    job = make_job(10, chunk_size=4)  # committed, never published: the API process "died"
    t0 = utcnow()
    sent: list[Chunk] = []
    report = jobs.reconcile(session, publish=sent.append, stale_after_seconds=300, now=t0)
    assert report.published == 3 and sorted(c.start for c in sent) == [0, 4, 8]
    sent.clear()
    again = jobs.reconcile(session, publish=sent.append, stale_after_seconds=300, now=t0)
    assert again.published == 0
    # Chunks still queued long after their last publish are published again (lost message).
    cs = claim(session, job, "w", start=0, end=4, now=t0)
    jobs.complete_items(session, worker_id="w", results=[ok(c) for c in cs], now=t0)
    report = jobs.reconcile(session, publish=sent.append, stale_after_seconds=300,
                            now=t0 + timedelta(seconds=301))
    assert report.republished == 2 and sorted(c.start for c in sent) == [4, 8]


def test_reconcile_republishes_a_chunk_when_backoff_ends(
    session: Session, make_job: Callable[..., Job]
) -> None:
    job = make_job(4)
    t0 = utcnow()
    jobs.publish_pending(session, publish=lambda c: None, now=t0)
    (c,) = claim(session, job, "w", limit=1, now=t0)
    jobs.fail_items(session, worker_id="w", backoff_seconds=10, now=t0,
                    failures=[ItemFailure(c.id, FetchFailed("503"))])
    sent: list[Chunk] = []
    jobs.reconcile(session, publish=sent.append, stale_after_seconds=300, now=t0)
    assert sent == []  # other items are queued, but the chunk's message was just sent
    jobs.reconcile(session, publish=sent.append, stale_after_seconds=300,
                   now=t0 + timedelta(seconds=11))
    assert sent == [Chunk(job.id, 0, 4, 0)]


def test_reconcile_frees_expired_leases_and_gives_up_at_the_cap(
    session: Session, make_job: Callable[..., Job], tmp_path: Path
) -> None:
    job = make_job(2, max_attempts=2)
    store = LocalStore(tmp_path / "store")
    t0 = utcnow()
    jobs.publish_pending(session, publish=lambda c: None, now=t0)
    claim(session, job, "dead", now=t0)
    t1 = t0 + timedelta(seconds=LEASE + 1)
    sent: list[Chunk] = []
    report = jobs.reconcile(session, publish=sent.append, stale_after_seconds=300, now=t1)
    assert (report.requeued, report.failed) == (2, 0)
    assert sent == [Chunk(job.id, 0, 2, 0)]  # the dead worker's chunk goes out again
    assert statuses(session, job) == ["queued", "queued"]
    x, y = claim(session, job, "dead-again", now=t1)
    jobs.complete_items(session, worker_id="dead-again", results=[ok(x)], now=t1)
    t2 = t1 + timedelta(seconds=LEASE + 1)
    report = jobs.reconcile(session, publish=sent.append, stale_after_seconds=300, now=t2,
                            store=store)
    assert (report.requeued, report.failed, report.finalized) == (0, 1, 1)
    item = session.get(Item, y.id, populate_existing=True)
    assert item is not None and item.status == "failed" and item.error_code == "worker_lost"
    assert item.error_message == (
        "the worker running this item died 2 times (lease expired); giving up")
    final = jobs.get_job(session, job_id=job.id)
    assert final.status == "completed_with_errors" and final.results_key is not None


def test_reconcile_finishes_a_missed_or_interrupted_finalisation(
    session: Session, make_job: Callable[..., Job], tmp_path: Path
) -> None:
    store = LocalStore(tmp_path / "store")
    missed = make_job(2)
    # A completer died after committing its items, before maybe_finalize.
    session.execute(update(Item).where(Item.job_id == missed.id).values(status="succeeded"))
    session.commit()
    stuck = make_job(1)
    session.execute(update(Item).where(Item.job_id == stuck.id).values(status="failed"))
    old = utcnow() - timedelta(hours=1)
    session.execute(update(Job).where(Job.id == stuck.id)
                    .values(status="finalizing", updated_at=old))
    session.commit()
    report = jobs.reconcile(session, publish=lambda c: None, stale_after_seconds=300, store=store)
    assert report.finalized == 2
    assert jobs.get_job(session, job_id=missed.id).status == "succeeded"
    assert jobs.get_job(session, job_id=stuck.id).status == "failed"
    assert store.exists(jobs.get_job(session, job_id=stuck.id).results_key or "")


def test_concurrent_claimers_split_the_items_without_overlap(
    session_factory: sessionmaker[Session], make_job: Callable[..., Job]
) -> None:
    job = make_job(60, chunk_size=60)
    n_workers = 4
    got: dict[str, list[int]] = {f"w{i}": [] for i in range(n_workers)}
    barrier = threading.Barrier(n_workers)
    errors: list[BaseException] = []

    def work(worker: str) -> None:
        try:
            with session_factory() as s:
                barrier.wait()
                while batch := jobs.claim_items(s, job_id=job.id, start=0, end=60,
                                                worker_id=worker, limit=3, lease_seconds=LEASE):
                    got[worker] += [c.id for c in batch]
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    claimed = [i for ids in got.values() for i in ids]
    assert len(claimed) == 60 and len(set(claimed)) == 60  # every item once, none twice
