"""Lease rows (loom.jobs.leases, migration 0015): a claim writes one naming its items and
updates the items in place; the heartbeat extends rows with their items; a row goes only when
none of its items still runs under its worker; the reconciler frees expired ones from them; and
lineage still shows every attempt's claim although no 'claimed' event row is written."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from jobs_helpers import LEASE, claim, events, ok
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from loom import jobs
from loom.errors import FetchFailed
from loom.jobs.leases import running_by_tenant
from loom.models import Item, Job, Lease, utcnow


def leases(session: Session) -> list[Lease]:
    session.commit()
    return list(session.scalars(select(Lease).order_by(Lease.id)))


def kinds(session: Session, item_id: int) -> list[tuple[str, int | None, str | None]]:
    return [(e["kind"], e["attempt"], e["worker_id"])
            for e in jobs.item_lineage(session, item_id=item_id)["events"]]


def test_a_claim_writes_one_lease_row_naming_its_items(
    session: Session, make_job: Callable[..., Job]
) -> None:
    job = make_job(6)
    first = claim(session, job, "w1", limit=4)
    second = claim(session, job, "w2", limit=4)
    rows = leases(session)
    assert [(r.job_id, r.tenant_id, r.worker_id, sorted(r.item_ids)) for r in rows] == [
        (job.id, job.tenant_id, "w1", sorted(c.id for c in first)),
        (job.id, job.tenant_id, "w2", sorted(c.id for c in second)),
    ]
    assert {c.lease_id for c in first} == {rows[0].id}
    assert {c.lease_id for c in second} == {rows[1].id}
    assert all(r.expires_at > utcnow() for r in rows)
    assert events(session, job, "claimed") == 0


def test_a_claim_updates_its_items_in_place(pg_url: str) -> None:
    """No index of items reads what a claim changes, so PostgreSQL updates the claimed rows on
    their pages (HOT), writing no index entry."""
    from loom import tenants
    from loom.db import make_engine, make_session_factory
    from loom.jobs.hot_pg import hot_connection, statement

    engine = make_engine(pg_url)
    stats = text("SELECT n_tup_hot_upd, n_tup_upd FROM pg_stat_user_tables "
                 "WHERE relname = 'items'")

    def flushed(session: Session) -> tuple[int, int]:
        with hot_connection(session) as conn:  # the claim's statistics, flushed now
            conn.execute(statement(text("SELECT pg_stat_force_next_flush()")), {})
            conn.execute(statement(text("SELECT 1")), {})
        session.execute(text("SELECT pg_stat_clear_snapshot()"))
        hot, updated = session.execute(stats).one()
        session.commit()
        return int(hot), int(updated)

    try:
        with make_session_factory(engine)() as session:
            hot0, updated0 = flushed(session)
            tenant = tenants.ensure_tenant(session, name="t")
            job = jobs.submit_job(session, tenant_id=tenant.id, task="caption",
                                  model_name="loom-shapes", chunk_size=64, max_attempts=3,
                                  items=[{"input": {"image_key": f"k/{i}.png"}}
                                         for i in range(64)])
            got = jobs.claim_items(session, job_id=job.id, start=0, end=64, worker_id="w",
                                   limit=64, lease_seconds=LEASE)
            assert len(got) == 64
            hot, updated = flushed(session)
        # A claimed row is some 50 bytes longer (its lease): a few of a page's rows may find no
        # room left by fillfactor 50 and move. An index on status would make it none at all.
        assert updated - updated0 == 64 and hot - hot0 >= 0.8 * 64
    finally:
        engine.dispose()


def test_the_heartbeat_extends_the_rows_with_their_items(
    session: Session, make_job: Callable[..., Job]
) -> None:
    job = make_job(4)
    mine = claim(session, job, "w1", limit=2)
    others = claim(session, job, "w2", limit=2)
    before = {r.worker_id: r.expires_at for r in leases(session)}
    later = utcnow() + timedelta(seconds=30)
    assert jobs.heartbeat(session, item_ids=[mine[0].id], worker_id="w1", lease_seconds=LEASE,
                          now=later) == 1
    after = {r.worker_id: r.expires_at for r in leases(session)}
    assert after["w1"] == later + timedelta(seconds=LEASE) > before["w1"]
    assert after["w2"] == before["w2"]  # another worker's row is not touched
    assert others


def test_a_lease_row_goes_with_the_last_of_its_items_never_before(
    session: Session, make_job: Callable[..., Job]
) -> None:
    job = make_job(4)
    got = claim(session, job, "w", limit=4)
    (lease_id,) = {c.lease_id for c in got}
    # Ending it while two of its items still run under the worker: it stays.
    assert jobs.complete_items(session, worker_id="w", results=[ok(c) for c in got[:2]],
                               end_leases={lease_id}) == 2
    assert [r.id for r in leases(session)] == [lease_id]
    assert jobs.end_leases(session, worker_id="w", lease_ids={lease_id}) == 0
    # A failure (retried: queued again) and the last completion end it.
    jobs.fail_items(session, worker_id="w", backoff_seconds=1.0,
                    failures=[jobs.ItemFailure(got[2].id, FetchFailed("gone"),
                                               attempt=got[2].attempts)])
    assert jobs.complete_items(session, worker_id="w", results=[ok(got[3])],
                               end_leases={lease_id}) == 1
    assert leases(session) == []


def test_another_workers_end_leaves_the_row(
    session: Session, make_job: Callable[..., Job]
) -> None:
    job = make_job(2)
    got = claim(session, job, "w1")
    assert jobs.end_leases(session, worker_id="w2", lease_ids={got[0].lease_id}) == 0
    assert len(leases(session)) == 1


def test_the_reconciler_frees_expired_leases_from_their_rows_and_drops_the_rows(
    session: Session, make_job: Callable[..., Job]
) -> None:
    job = make_job(4, max_attempts=2)
    dead = claim(session, job, "dead", limit=2)
    alive = claim(session, job, "alive", limit=2)
    later = utcnow() + timedelta(seconds=LEASE / 2)
    jobs.heartbeat(session, item_ids=[c.id for c in alive], worker_id="alive",
                   lease_seconds=LEASE, now=later)
    expired_at = utcnow() + timedelta(seconds=LEASE + 1)
    report = jobs.reconcile(session, publish=lambda _c: None, stale_after_seconds=3600,
                            now=expired_at)
    assert report.requeued == 2
    session.commit()
    status = {i.id: (i.status, i.error_code)
              for i in session.scalars(select(Item).where(Item.job_id == job.id))}
    assert all(status[c.id] == ("queued", "worker_lost") for c in dead)
    assert all(status[c.id][0] == "running" for c in alive)
    assert [r.worker_id for r in leases(session)] == ["alive"]
    # The freed attempt's claim and its end, with the worker that held it.
    assert kinds(session, dead[0].id) == [("claimed", 1, "dead"), ("lease_expired", 1, "dead")]


def test_running_items_per_tenant_come_from_live_lease_rows(
    session: Session, make_job: Callable[..., Job]
) -> None:
    job = make_job(5)
    got = claim(session, job, "w", limit=4)
    assert running_by_tenant(session, tenant_ids=[job.tenant_id], now=utcnow()) == {
        job.tenant_id: 4}
    jobs.complete_items(session, worker_id="w", results=[ok(got[0])])
    assert running_by_tenant(session, tenant_ids=[job.tenant_id], now=utcnow()) == {
        job.tenant_id: 3}
    later = utcnow() + timedelta(seconds=LEASE + 1)
    assert running_by_tenant(session, tenant_ids=[job.tenant_id], now=later) == {}


def test_release_gives_back_the_items_and_drops_the_rows(
    session: Session, make_job: Callable[..., Job]
) -> None:
    job = make_job(3)
    got = claim(session, job, "w")
    assert jobs.release_leases(session, worker_id="w") == 3
    assert leases(session) == []
    assert kinds(session, got[0].id) == [("claimed", 1, "w"), ("released", 1, "w")]


@pytest.mark.parametrize("end", ["retried", "taken_over", "running"])
def test_lineage_shows_each_attempts_claim(
    session: Session, make_job: Callable[..., Job], end: str
) -> None:
    """Without 'claimed' event rows: from the row that ended the attempt, or from the item
    while it runs."""
    job = make_job(1)
    (first,) = claim(session, job, "w1")
    if end == "running":
        assert kinds(session, first.id) == [("claimed", 1, "w1")]
        return
    if end == "retried":
        jobs.fail_items(session, worker_id="w1", backoff_seconds=0.0,
                        failures=[jobs.ItemFailure(first.id, FetchFailed("blip"),
                                                   attempt=first.attempts)])
        (second,) = claim(session, job, "w2", now=utcnow() + timedelta(seconds=1))
        middle = ("retry_scheduled", 1, "w1")
    else:
        (second,) = claim(session, job, "w2", now=utcnow() + timedelta(seconds=LEASE + 1))
        middle = ("lease_expired", 1, "w1")
    jobs.complete_items(session, worker_id="w2", results=[ok(second)])
    history = jobs.item_lineage(session, item_id=first.id)["events"]
    assert [(e["kind"], e["attempt"], e["worker_id"]) for e in history] == [
        ("claimed", 1, "w1"), middle, ("claimed", 2, "w2"), ("succeeded", 2, "w2")]
    assert history[0]["created_at"] <= history[2]["created_at"]


def test_the_reconciler_drops_live_rows_that_cover_nothing_any_more(
    session: Session, make_job: Callable[..., Job]
) -> None:
    """A completion that did not end its lease row (no end_leases) leaves it behind; the next
    reconcile drops it, and keeps the rows of items still running."""
    job = make_job(4)
    done = claim(session, job, "w1", limit=2)
    running = claim(session, job, "w2", limit=2)
    jobs.complete_items(session, worker_id="w1", results=[ok(c) for c in done])
    assert len(leases(session)) == 2
    jobs.reconcile(session, publish=lambda _c: None, stale_after_seconds=3600)
    assert [r.worker_id for r in leases(session)] == ["w2"]
    assert running
