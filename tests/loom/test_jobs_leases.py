"""Giving leases back (jobs.release_leases): a worker that stops cleanly returns what it claimed
but did not run; on SQLite and PostgreSQL (db_url)."""

from __future__ import annotations

from collections.abc import Callable

from jobs_helpers import claim, ok, statuses
from sqlalchemy import select
from sqlalchemy.orm import Session

from loom import jobs
from loom.models import Item, Job


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
