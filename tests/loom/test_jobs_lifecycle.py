"""Submission, leases, fenced completion and failure, on SQLite and PostgreSQL (db_url)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta

import pytest
from jobs_helpers import LEASE, claim, events, ok, statuses
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from loom import jobs, tenants
from loom.errors import (
    FetchFailed,
    IdempotencyConflict,
    InvalidInput,
    InvalidRequest,
    ModelError,
)
from loom.jobs import Chunk, ItemFailure
from loom.models import Item, Job, Outbox, Output, utcnow


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


def test_a_completion_told_its_job_is_still_open_leaves_finalising_to_the_next(
    session: Session, make_job: Callable[..., Job]
) -> None:
    """``open_jobs``: the worker still holds items of the job, so the "drained?" read is
    skipped; the completion of those items finalises it (and the reconciler, had the hint been
    wrong)."""
    job = make_job(4)
    first = claim(session, job, "w1", limit=2)
    rest = claim(session, job, "w1", limit=2)
    assert jobs.complete_items(session, worker_id="w1", results=[ok(c) for c in first],
                               open_jobs={job.id}) == 2
    assert jobs.complete_items(session, worker_id="w1", results=[ok(c) for c in rest]) == 2
    session.commit()
    assert session.scalar(select(Job.status).where(Job.id == job.id)) == "succeeded"

    # A wrong hint (nothing was left open): the job stays running until the reconciler looks.
    other = make_job(2)
    claimed = claim(session, other, "w1", limit=2)
    assert jobs.complete_items(session, worker_id="w1", results=[ok(c) for c in claimed],
                               open_jobs={other.id}) == 2
    session.commit()
    assert session.scalar(select(Job.status).where(Job.id == other.id)) == "running"
    report = jobs.reconcile(session, publish=lambda _c: None, stale_after_seconds=3600)
    assert report.finalized == 1
    session.commit()
    assert session.scalar(select(Job.status).where(Job.id == other.id)) == "succeeded"
