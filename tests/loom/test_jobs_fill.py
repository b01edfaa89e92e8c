"""Filling a batch from other jobs (loom.jobs.fill): which jobs may share a batch, in what order,
that a filled item is claimed once, under the worker's lease, like any other, and that the jobs
one batch drains finalise together (loom.jobs.finalize.finalize_jobs)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from jobs_helpers import LEASE, claim, events, ok, statuses
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from loom import jobs, tenants
from loom.jobs.finalize import manifest_chunks
from loom.errors import StoreUnavailable
from loom.storage import LocalStore
from loom.models import Event, Item, Job, Lease, utcnow


def fill(session: Session, like: Job, worker: str = "w", limit: int = 32) -> list[jobs.ClaimedItem]:
    return jobs.claim_fill(session, like=like.id, worker_id=worker, limit=limit,
                           lease_seconds=LEASE, now=utcnow())


def spread(items: list[jobs.ClaimedItem], by: dict[str, str]) -> list[str]:
    return [by[i.job_id] for i in items]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_fill_goes_by_priority_then_tenants_take_turns(
    session: Session, make_job: Callable[..., Job], tenant_id: str
) -> None:
    other = tenants.ensure_tenant(session, name="other").id
    own = make_job(2)
    b = make_job(3)
    c = make_job(3)
    d = make_job(3, tenant_id=other)  # submitted after b and c, but its tenant's first job
    e = make_job(2, priority=5)
    names = {b.id: "b", c.id: "c", d.id: "d", e.id: "e"}

    got = fill(session, own, limit=6)

    assert spread(got, names) == ["e", "e", "d", "d", "d", "b"]
    assert [i.index for i in got] == [0, 1, 0, 1, 2, 0]
    assert {i.tenant_id for i in got if i.job_id == d.id} == {other}
    assert all(i.task == "caption" and i.model_name == "loom-shapes" and i.attempts == 1
               for i in got)
    # Queued jobs it took items from are running now; the own job is not touched.
    session.commit()
    status = {r.id: r.status for r in session.execute(select(Job.id, Job.status))}
    assert status[e.id] == status[d.id] == status[b.id] == "running"
    assert status[own.id] == "queued"
    assert statuses(session, b) == ["running", "queued", "queued"]
    # One lease row per job the fill took from, naming its items (no 'claimed' events).
    assert not session.scalars(select(Event.item_id).where(Event.kind == "claimed")).all()
    rows = {r.id: r for r in session.scalars(select(Lease))}
    assert {(r.job_id, r.worker_id) for r in rows.values()} == {
        (j.id, "w") for j in (e, d, b)}
    for i in got:
        assert rows[i.lease_id].job_id == i.job_id
        assert sorted(rows[i.lease_id].item_ids) == sorted(x.id for x in got
                                                           if x.job_id == i.job_id)

    rest = fill(session, own, worker="w2")
    assert spread(rest, names) == ["b", "b", "c", "c", "c"]  # nothing twice
    assert fill(session, own, worker="w3") == []


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_fill_takes_only_what_one_model_call_serves(
    session: Session, make_job: Callable[..., Job], tenant_id: str
) -> None:
    other = tenants.ensure_tenant(session, name="other").id
    own = make_job(1, params={"max_tokens": 8})
    same = make_job(1, params={"max_tokens": 8}, tenant_id=other)
    make_job(1, params={"max_tokens": 9})
    make_job(1, params={})
    make_job(1, task="vqa", params={"max_tokens": 8},
             items=[{"input": {"image_key": "k/0.png", "question": "what color is it?"}}])
    make_job(1, model_name="hf:some/model", params={"max_tokens": 8})
    make_job(1, params={"max_tokens": 8}, use_cache=False)
    cancelled = make_job(1, params={"max_tokens": 8})
    jobs.cancel_job(session, job_id=cancelled.id)

    assert [i.job_id for i in fill(session, own)] == [same.id]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_fill_leaves_retried_and_backed_off_items_to_their_own_chunks(
    session: Session, make_job: Callable[..., Job]
) -> None:
    own = make_job(1)
    mate = make_job(3)
    # Item 0 died with its worker once (an attempt spent: a possible poison input), item 1
    # waits out a backoff; only item 2 is fresh.
    session.execute(update(Item).where(Item.job_id == mate.id, Item.index == 0)
                    .values(attempts=1))
    session.execute(update(Item).where(Item.job_id == mate.id, Item.index == 1)
                    .values(available_at=utcnow() + timedelta(minutes=5)))
    session.commit()
    assert [i.index for i in fill(session, own)] == [2]
    # A job with nothing fresh does not take a place among the jobs looked at.
    later = make_job(1)
    assert [i.job_id for i in fill(session, own, limit=1)] == [later.id]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_registered_model_fills_from_its_own_tenant_only(
    session: Session, make_job: Callable[..., Job]
) -> None:
    # "mine@v1" names a model in one tenant's registry; another tenant's "mine@v1" is another
    # model, so their items cannot share a model call.
    other = tenants.ensure_tenant(session, name="other").id
    own = make_job(1, model_name="mine@v1")
    mate = make_job(1, model_name="mine@v1")
    make_job(1, model_name="mine@v1", tenant_id=other)
    assert [i.job_id for i in fill(session, own)] == [mate.id]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_filled_items_complete_fenced_and_their_jobs_finalize(
    session: Session, make_job: Callable[..., Job]
) -> None:
    own = make_job(1)
    mates = [make_job(2) for _ in range(3)]
    mine = claim(session, own, "w")
    got = fill(session, own, worker="w")
    assert len(got) == 6
    # A stale worker cannot complete what the filler holds.
    assert jobs.complete_items(session, worker_id="x", results=[ok(i) for i in got]) == 0
    assert jobs.complete_items(session, worker_id="w", results=[ok(i) for i in mine + got]) == 7
    session.commit()
    final = session.scalars(select(Job.status).where(Job.id.in_([j.id for j in mates]))).all()
    assert final == ["succeeded"] * 3


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_fill_on_sqlite_claims_nothing(session: Session, make_job: Callable[..., Job]) -> None:
    own = make_job(1)
    make_job(3)
    assert fill(session, own) == []


def test_jobs_drained_by_one_batch_finalize_together_and_a_store_failure_holds_only_its_own(
    session: Session, make_job: Callable[..., Job], tmp_path: Path
) -> None:
    """A filled batch drains several jobs at once (loom.jobs.finalize.finalize_jobs): each gets
    its manifest and terminal status once; a job whose manifest cannot be written stays
    'finalizing' for the reconciler while the others finish."""
    a, b, c = make_job(2), make_job(2), make_job(2)

    class Flaky(LocalStore):
        def put_chunks(self, key: str, *args: Any, **kwargs: Any) -> None:
            if b.id in key:
                raise StoreUnavailable("store down")
            super().put_chunks(key, *args, **kwargs)

    store = Flaky(tmp_path / "store")
    got = [i for j in (a, b, c) for i in claim(session, j, "w")]
    assert jobs.complete_items(session, worker_id="w", results=[ok(i) for i in got],
                               store=store) == 6
    session.commit()
    status = {r.id: r.status for r in session.execute(select(Job.id, Job.status))}
    assert (status[a.id], status[b.id], status[c.id]) == ("succeeded", "finalizing", "succeeded")
    for job in (a, c):
        assert events(session, job, "finalized") == 1
        key = session.scalar(select(Job.results_key).where(Job.id == job.id))
        assert key is not None and len(store.get(key).splitlines()) == 2
        # Read for the three jobs at once, written as a job's own streamed manifest is.
        assert store.get(key) == b"".join(manifest_chunks(session, job_id=job.id))
    # The reconciler's retry, once the store is back; then nobody finalises it again.
    healthy = LocalStore(tmp_path / "store")
    assert jobs.complete_finalization(session, job_id=b.id, store=healthy)
    assert not jobs.complete_finalization(session, job_id=b.id, store=healthy)
    assert jobs.finalize_jobs(session, job_ids=[a.id, b.id, c.id], store=healthy) == []
    assert events(session, b, "finalized") == 1
