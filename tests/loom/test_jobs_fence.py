"""The completion fence, deterministically: a stale owner, a stale attempt, and a stale result
arriving after retry_failed never overwrite the newer attempt; attempt numbers never repeat.
Also: an outage release (jobs.release_items) gives a lease back without spending the attempt."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from loom import jobs
from loom.errors import ModelError
from loom.jobs import ItemFailure
from loom.models import Item, Job, Output, utcnow

from jobs_helpers import LEASE, claim, ok


def _item(session: Session, item_id: int) -> Item:
    session.commit()
    item = session.get(Item, item_id, populate_existing=True)
    assert item is not None
    return item


def _outputs(session: Session, item_id: int) -> list[Output]:
    session.commit()
    return list(session.scalars(select(Output).where(Output.item_id == item_id)))


def test_a_stale_owner_cannot_complete_or_fail(
    session: Session, make_job: Callable[..., Job]
) -> None:
    """w1's lease expired and w2 took the item over: w1's result (even without an attempt pin)
    and its failure match nothing; w2's result wins."""
    job = make_job(1)
    (c1,) = claim(session, job, "w1")
    later = utcnow() + timedelta(seconds=LEASE + 1)
    (c2,) = claim(session, job, "w2", now=later)
    assert c2.attempts == c1.attempts + 1
    stale = ok(c1, "stale")
    stale.attempt = None  # the owner check alone must reject it
    assert jobs.complete_items(session, worker_id="w1", results=[stale]) == 0
    assert jobs.fail_items(session, worker_id="w1", backoff_seconds=0,
                           failures=[ItemFailure(c1.id, ModelError("late"))]) == 0
    assert _item(session, c1.id).status == "running"
    assert jobs.complete_items(session, worker_id="w2", results=[ok(c2, "fresh")]) == 1
    (out,) = _outputs(session, c1.id)
    assert (out.text, out.worker_id, out.attempt) == ("fresh", "w2", c2.attempts)


def test_a_stale_attempt_of_the_same_worker_is_rejected(
    session: Session, make_job: Callable[..., Job]
) -> None:
    """The same worker id re-claimed the item after its own lease expired: the result pinned to
    the first attempt must not complete the second."""
    job = make_job(1)
    (c1,) = claim(session, job, "w")
    (c2,) = claim(session, job, "w", now=utcnow() + timedelta(seconds=LEASE + 1))
    assert c2.attempts == 2
    assert jobs.complete_items(session, worker_id="w", results=[ok(c1, "old")]) == 0
    assert jobs.fail_items(session, worker_id="w", backoff_seconds=0,
                           failures=[ItemFailure(c1.id, ModelError("old"), attempt=1)]) == 0
    assert jobs.complete_items(session, worker_id="w", results=[ok(c2, "new")]) == 1
    (out,) = _outputs(session, c1.id)
    assert (out.text, out.attempt) == ("new", 2)


def test_a_stale_result_after_retry_failed_is_rejected(
    session: Session, make_job: Callable[..., Job]
) -> None:
    """Attempt 1 is still running somewhere when its lease is taken over and the item fails for
    good; retry_failed then gives fresh attempts. The same worker id claims again: the number of
    the new attempt differs from attempt 1, so the stale result of attempt 1 is rejected."""
    job = make_job(1, max_attempts=2)
    (c1,) = claim(session, job, "w")
    (c2,) = claim(session, job, "w2", now=utcnow() + timedelta(seconds=LEASE + 1))
    jobs.fail_items(session, worker_id="w2", backoff_seconds=0,
                    failures=[ItemFailure(c2.id, ModelError("boom"), attempt=c2.attempts)])
    assert _item(session, c1.id).status == "failed"
    assert jobs.retry_failed(session, job_id=job.id) == 1
    (c3,) = claim(session, job, "w")
    assert c3.attempts not in (c1.attempts, c2.attempts)  # numbers never repeat
    assert c3.attempts > c2.attempts
    assert jobs.complete_items(session, worker_id="w", results=[ok(c1, "stale")]) == 0
    assert jobs.complete_items(session, worker_id="w", results=[ok(c3, "fresh")]) == 1
    (out,) = _outputs(session, c1.id)
    assert (out.text, out.attempt) == ("fresh", c3.attempts)


def test_retry_failed_gives_fresh_attempts_up_to_the_cap(
    session: Session, make_job: Callable[..., Job]
) -> None:
    job = make_job(1, max_attempts=1)
    (c1,) = claim(session, job, "w")
    jobs.fail_items(session, worker_id="w", backoff_seconds=0,
                    failures=[ItemFailure(c1.id, ModelError("boom"), attempt=1)])
    assert _item(session, c1.id).error_message == "boom (gave up after 1 attempts)"
    jobs.retry_failed(session, job_id=job.id)
    (c2,) = claim(session, job, "w")
    assert c2.attempts == 2
    jobs.fail_items(session, worker_id="w", backoff_seconds=0,
                    failures=[ItemFailure(c2.id, ModelError("boom"), attempt=2)])
    item = _item(session, c1.id)
    # One attempt spent since the retry: the cap of 1 ends it again.
    assert (item.status, item.error_message) == ("failed", "boom (gave up after 1 attempts)")
    assert claim(session, job, "w") == []


def test_release_gives_the_lease_back_without_spending_the_attempt(
    session: Session, make_job: Callable[..., Job]
) -> None:
    """An outage longer than every attempt's backoff: the item is released many times and still
    claimable with max_attempts=1; attempt numbers keep going up."""
    job = make_job(2, max_attempts=1)
    seen: list[int] = []
    for _ in range(5):
        (c, _other) = claim(session, job, "w")
        seen.append(c.attempts)
        released = jobs.release_items(session, worker_id="w", reason="store unavailable",
                                      leases=[(c.id, c.attempts), (_other.id, None)])
        assert released == 2
        assert _item(session, c.id).status == "queued"
    assert seen == [1, 2, 3, 4, 5]
    (c, other) = claim(session, job, "w")
    assert jobs.complete_items(session, worker_id="w", results=[ok(c), ok(other)]) == 2
    assert jobs.get_job(session, job_id=job.id).status == "succeeded"


def test_release_is_fenced(session: Session, make_job: Callable[..., Job]) -> None:
    """A release by a stale owner or for a stale attempt leaves the newer lease alone."""
    job = make_job(1)
    (c1,) = claim(session, job, "w1")
    (c2,) = claim(session, job, "w2", now=utcnow() + timedelta(seconds=LEASE + 1))
    assert jobs.release_items(session, worker_id="w1", reason="x", leases=[(c1.id, None)]) == 0
    assert jobs.release_items(session, worker_id="w2", reason="x",
                              leases=[(c2.id, c1.attempts)]) == 0
    item = _item(session, c1.id)
    assert (item.status, item.lease_owner, item.attempts_excused) == ("running", "w2", 0)


def test_expired_lease_after_releases_counts_only_spent_attempts(
    session: Session, make_job: Callable[..., Job]
) -> None:
    """The reconciler ends an item worker_lost only when its SPENT attempts reach the cap."""
    job = make_job(1, max_attempts=2)
    for _ in range(3):
        (c,) = claim(session, job, "w")
        jobs.release_items(session, worker_id="w", reason="outage", leases=[(c.id, c.attempts)])
    (c,) = claim(session, job, "w")  # attempt 4, the first one spent
    later = utcnow() + timedelta(seconds=LEASE + 1)
    report = jobs.reconcile(session, publish=lambda _c: None, stale_after_seconds=3600, now=later)
    assert (report.requeued, report.failed) == (1, 0)
    assert _item(session, c.id).status == "queued"
