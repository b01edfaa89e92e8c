"""The reconciler: outbox, stale chunks, expired leases, missed finalisation (db_url)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from jobs_helpers import LEASE, claim, ok, statuses
from sqlalchemy import text, update
from sqlalchemy.orm import Session

from loom import jobs
from loom.errors import (
    FetchFailed,
)
from loom.jobs import Chunk, ItemFailure
from loom.models import Item, Job, utcnow
from loom.storage import LocalStore

# The module, not the function of the same name that loom.jobs exports.
reconcile_module = importlib.import_module("loom.jobs.reconcile")


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


def test_stale_chunk_scan_probes_each_chunk_by_index_on_postgresql(
    session: Session, make_job: Callable[..., Job]
) -> None:
    """The scan reads each chunk's own queued items, never every chunk against every queued item
    of its job, with or without statistics (a job just loaded has none). Written as EXISTS it
    was a hash semi-join on job_id; over a (job_id, status) index, a probe read the job's every
    queued item. Either grew with the square of the job (2.5 s for 100,000 items), run by every
    worker's reconciler."""
    if session.get_bind().dialect.name != "postgresql":
        return  # the plan is PostgreSQL's; SQLite runs the correlated subquery per row as written
    # A database whose statistics say queued items are rare (earlier jobs all finished), then
    # a big job loaded since the last ANALYZE: what a busy fleet's database looks like.
    old = make_job(20_000, chunk_size=32)
    session.execute(update(Item).where(Item.job_id == old.id).values(status="succeeded"))
    session.execute(update(Job).where(Job.id == old.id).values(status="succeeded"))
    session.commit()
    session.execute(text("ANALYZE items"))
    job = make_job(20_000, chunk_size=32)  # big enough for the old plans to be chosen
    jobs.publish_pending(session, publish=lambda _chunk: None, job_id=job.id)
    # Half done, as in the middle of a run (whose chunk probes then come back empty).
    session.execute(update(Item).where(Item.job_id == job.id, Item.index < 10_000)
                    .values(status="succeeded"))
    session.commit()
    for analyzed in (False, True):
        if analyzed:
            session.execute(text("ANALYZE items"))
            session.execute(text("ANALYZE outbox"))
        stmt = reconcile_module.stale_chunks_query(now=utcnow(), stale_after_seconds=300,
                                                   limit=1000)
        sql = str(stmt.compile(dialect=session.get_bind().dialect,
                               compile_kwargs={"literal_binds": True}))
        plan = session.execute(text("EXPLAIN (ANALYZE, FORMAT JSON) " + sql)).scalar_one()
        nodes: list[dict[str, Any]] = []
        todo = [plan[0]["Plan"]]
        while todo:
            node = todo.pop()
            nodes.append(node)
            todo.extend(node.get("Plans", []))
        on_items = [n for n in nodes if n.get("Relation Name") == "items"]
        assert on_items and all(n["Node Type"] in ("Index Scan", "Index Only Scan")
                                for n in on_items), (analyzed, [n["Node Type"] for n in on_items])
        # Fresh chunks with nothing in backoff: each probe reads at most its own 32 items
        # (EXPLAIN gives rows per loop).
        examined = sum((n.get("Rows Removed by Filter", 0) + n.get("Actual Rows", 0))
                       * n.get("Actual Loops", 1) for n in on_items)
        # A join may drop each chunk once (the busy/stale test sits there), never chunk x item.
        joined_away = sum(n.get("Rows Removed by Join Filter", 0) * n.get("Actual Loops", 1)
                          for n in nodes)
        assert examined <= 10_000 and joined_away <= 2 * 625, (analyzed, examined, joined_away)
    session.rollback()


def test_a_job_that_a_worker_is_running_keeps_its_waiting_chunks_unrepublished(
    session: Session, make_job: Callable[..., Job]
) -> None:
    """A chunk waiting long in the broker's queue is not lost while a worker holds a live lease
    on the job (it claims across the job): republishing it would only queue a duplicate. Once
    no lease is live, the waiting chunks are republished."""
    job = make_job(12, chunk_size=4)
    t0 = utcnow()
    jobs.publish_pending(session, publish=lambda c: None, now=t0)
    later = t0 + timedelta(seconds=301)
    (c,) = claim(session, job, "w", limit=1, now=later)
    sent: list[Chunk] = []
    report = jobs.reconcile(session, publish=sent.append, stale_after_seconds=300, now=later)
    assert report.republished == 0 and sent == []
    jobs.complete_items(session, worker_id="w", results=[ok(c)], now=later)
    report = jobs.reconcile(session, publish=sent.append, stale_after_seconds=300,
                            now=later + timedelta(seconds=1))
    assert report.republished == 3 and sorted(c.start for c in sent) == [0, 4, 8]
