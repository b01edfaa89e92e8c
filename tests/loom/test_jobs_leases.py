"""Giving leases back (jobs.release_leases): a worker that stops cleanly returns what it claimed
but did not run; on SQLite and PostgreSQL (db_url)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from jobs_helpers import LEASE, claim, ok, statuses
from sqlalchemy import select
from sqlalchemy.orm import Session

from loom import jobs
from loom.errors import FetchFailed, ModelError
from loom.models import Item, Job, utcnow


def test_release_returns_unrun_items_fresh_and_is_fenced(
    session: Session, make_job: Callable[..., Job]
) -> None:
    job = make_job(6)
    mine = claim(session, job, "w1", limit=4)
    theirs = claim(session, job, "w2", limit=2)
    assert len(mine) == 4 and len(theirs) == 2
    assert jobs.complete_items(session, worker_id="w1", results=[ok(mine[0])]) == 1

    # Only w1's running items of the ids given; w2's lease and w1's finished item stay.
    ids = [c.id for c in mine] + [theirs[0].id]
    assert jobs.release_leases(session, worker_id="w1", item_ids=ids) == 3
    assert statuses(session, job) == ["succeeded", "queued", "queued", "queued", "running",
                                      "running"]
    released = session.scalars(select(Item).where(Item.id.in_([c.id for c in mine[1:]]))).all()
    for item in released:
        assert item.lease_owner is None and item.lease_expires_at is None
        # The unrun attempt is refunded (excused: not a suspect on resume); its number stays used.
        assert item.attempts - item.attempts_excused == 0
    assert jobs.release_leases(session, worker_id="w1", item_ids=[]) == 0

    # Claimable again at once, by anyone; then all of w2's go back without naming them.
    again = claim(session, job, "w3", limit=10)
    assert sorted(c.index for c in again) == [1, 2, 3]
    assert all(c.attempts == 2 for c in again)  # attempt numbers never repeat
    assert jobs.release_leases(session, worker_id="w2") == 2
    assert statuses(session, job)[4:] == ["queued", "queued"]


def test_claim_head_reads_the_job_and_the_suspects_of_its_range(
    session: Session, make_job: Callable[..., Job]
) -> None:
    """What a worker reads before each claim (one statement on PostgreSQL): the suspects are the
    items whose last attempt may have killed its process (lease expired) or broken its batch
    (model_error); an item retried after an I/O error is no suspect."""
    job = make_job(6, max_attempts=5)
    now = utcnow()
    first = claim(session, job, "w1", limit=3, now=now)  # items 0, 1, 2
    jobs.fail_items(session, worker_id="w1", backoff_seconds=0, now=now, failures=[
        jobs.ItemFailure(item_id=first[1].id, error=ModelError("batch raised"), attempt=1),
        jobs.ItemFailure(item_id=first[2].id, error=FetchFailed("timed out"), attempt=1),
    ])
    later = now + timedelta(seconds=LEASE + 1)  # item 0's lease has expired
    whole = jobs.Chunk(job.id, 0, 6)
    head = jobs.claim_head(session, chunk=whole, limit=10, now=later)
    assert head == jobs.ClaimHead("running", 6, 5, [0, 1])
    assert head.suspects == jobs.suspect_indexes(session, chunk=whole, limit=10, now=later)
    assert jobs.claim_head(session, chunk=jobs.Chunk(job.id, 1, 6), limit=1,
                           now=later).suspects == [1]
    assert jobs.claim_head(session, chunk=whole, limit=10, now=now).suspects == [1]  # 0 leased

    jobs.cancel_job(session, job_id=job.id)
    head = jobs.claim_head(session, chunk=whole, limit=10, now=later)
    assert head.status in ("cancelling", "cancelled") and head.suspects == []
    assert jobs.claim_head(session, chunk=jobs.Chunk("nope", 0, 1), limit=1) == (None, 0, 1, [])
