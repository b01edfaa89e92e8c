"""Hypothesis state machine over claims, heartbeats, fenced completion/failure, cancel, lease
expiry (time is injected) and reconcile, with several workers, on SQLite and PostgreSQL.

Invariants: never two live claims of one item; terminal item states stay terminal; attempts
never decrease; a succeeded item has exactly one output (others none); a fenced write by a
worker that lost its lease changes nothing; a job whose items are all terminal is terminal.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from loom import jobs, tenants
from loom.errors import FetchFailed, InvalidInput
from loom.jobs import ItemFailure, ItemResult
from loom.models import ITEM_TERMINAL, JOB_TERMINAL, Item, Job, Output, utcnow

WORKERS = ("w0", "w1")
N_ITEMS = 3
LEASE = 10.0
MAX_ATTEMPTS = 2  # small, so examples often reach the cap
TERMINAL = {s.value for s in ITEM_TERMINAL}


@dataclass(frozen=True)
class Row:
    status: str
    owner: str | None
    attempts: int
    lease_expires_at: datetime | None
    available_at: datetime | None


class JobMachine(RuleBasedStateMachine):
    session_factory: sessionmaker[Session]  # set by the test before running

    def __init__(self) -> None:
        super().__init__()
        self.session = self.session_factory()
        tenant = tenants.ensure_tenant(self.session, name="sm")
        self.now = utcnow()
        self.job = jobs.submit_job(
            self.session, tenant_id=tenant.id, task="caption", model_name="m",
            items=[{"input": {"prompt": str(i)}} for i in range(N_ITEMS)],
            chunk_size=N_ITEMS, max_attempts=MAX_ATTEMPTS, now=self.now,
        )
        # What each worker believes it holds: item id -> attempt number of its claim.
        self.held: dict[str, dict[int, int]] = {w: {} for w in WORKERS}
        self.terminal: dict[int, str] = {}
        self.max_attempts_seen: dict[int, int] = {}
        self.granted: set[tuple[int, int]] = set()

    def teardown(self) -> None:
        self.session.close()

    # --- helpers ------------------------------------------------------------------------------

    def rows(self) -> dict[int, Row]:
        self.session.commit()  # fresh snapshot
        return {
            r.id: Row(r.status, r.lease_owner, r.attempts, r.lease_expires_at, r.available_at)
            for r in self.session.execute(
                select(Item.id, Item.status, Item.lease_owner, Item.attempts,
                       Item.lease_expires_at, Item.available_at)
                .where(Item.job_id == self.job.id))
        }

    def owns(self, row: Row, worker: str, attempt: int | None) -> bool:
        return (row.status == "running" and row.owner == worker
                and (attempt is None or row.attempts == attempt))

    # --- rules --------------------------------------------------------------------------------

    @rule(worker=st.sampled_from(WORKERS), limit=st.integers(1, N_ITEMS))
    def claim_again(self, worker: str, limit: int) -> None:
        self.claim(worker, limit)  # a second rule: claims are drawn twice as often

    @rule(worker=st.sampled_from(WORKERS), limit=st.integers(1, N_ITEMS))
    def claim(self, worker: str, limit: int) -> None:
        before = self.rows()
        claimed = jobs.claim_items(self.session, job_id=self.job.id, start=0, end=N_ITEMS,
                                   worker_id=worker, limit=limit, lease_seconds=LEASE,
                                   now=self.now)
        assert len(claimed) <= limit
        for c in claimed:
            prev = before[c.id]
            # Only a queued item past its backoff, or a running item whose lease expired.
            assert (prev.status == "queued" and (prev.available_at is None
                                                 or prev.available_at <= self.now)) or (
                prev.status == "running" and prev.lease_expires_at is not None
                and prev.lease_expires_at < self.now)
            assert prev.attempts < MAX_ATTEMPTS
            assert c.attempts == prev.attempts + 1
            assert (c.id, c.attempts) not in self.granted
            self.granted.add((c.id, c.attempts))
            self.held[worker][c.id] = c.attempts

    @rule(worker=st.sampled_from(WORKERS))
    def heartbeat(self, worker: str) -> None:
        before = self.rows()
        ids = list(self.held[worker])
        expected = sum(1 for i in ids if before[i].status == "running"
                       and before[i].owner == worker)
        n = jobs.heartbeat(self.session, item_ids=ids, worker_id=worker, lease_seconds=LEASE,
                           now=self.now)
        assert n == expected

    def holding(self) -> bool:
        return any(self.held.values())

    @precondition(holding)
    @rule(pin=st.booleans(), data=st.data())
    def complete(self, pin: bool, data: st.DataObject) -> None:
        worker = data.draw(st.sampled_from([w for w in WORKERS if self.held[w]]))
        held = sorted(self.held[worker].items())
        chosen = data.draw(st.lists(st.sampled_from(held), min_size=1, unique=True))
        before = self.rows()
        # Unpinned results are fenced by owner alone; pinned ones also by the attempt.
        expected = {i for i, a in chosen if self.owns(before[i], worker, a if pin else None)}
        n = jobs.complete_items(
            self.session, worker_id=worker, now=self.now,
            results=[ItemResult(i, "text", text=f"{worker}:{a}", attempt=a if pin else None)
                     for i, a in chosen],
        )
        assert n == len(expected)
        after = self.rows()
        for i, a in chosen:
            if i in expected:
                assert after[i].status == "succeeded"
                out = self.session.scalar(select(Output).where(Output.item_id == i))
                assert out is not None and out.worker_id == worker
                assert out.attempt == before[i].attempts
            else:  # lost the lease: nothing changed
                assert after[i] == before[i]
            del self.held[worker][i]

    @precondition(holding)
    @rule(transient=st.booleans(), pin=st.booleans(), data=st.data())
    def fail(self, transient: bool, pin: bool, data: st.DataObject) -> None:
        worker = data.draw(st.sampled_from([w for w in WORKERS if self.held[w]]))
        held = sorted(self.held[worker].items())
        i, a = data.draw(st.sampled_from(held))
        before = self.rows()
        err = FetchFailed("flaky") if transient else InvalidInput("bad")
        n = jobs.fail_items(self.session, worker_id=worker, backoff_seconds=1.0, now=self.now,
                            failures=[ItemFailure(i, err, attempt=a if pin else None)])
        after = self.rows()
        if self.owns(before[i], worker, a if pin else None):
            assert n == 1
            assert after[i].status in ("queued", "failed", "cancelled")
            if after[i].status == "queued":
                assert transient and before[i].attempts < MAX_ATTEMPTS
        else:
            assert n == 0 and after[i] == before[i]
        del self.held[worker][i]

    @rule(dice=st.integers(0, 7))
    def cancel(self, dice: int) -> None:
        if dice:  # cancelling ends the interesting part of an example: keep it rare
            return
        self.session.commit()
        status = jobs.get_job(self.session, job_id=self.job.id).status
        if status in ("queued", "running", "cancelling", "cancelled"):
            job = jobs.cancel_job(self.session, job_id=self.job.id, now=self.now)
            assert job.status in ("cancelling", "cancelled")
            assert all(r.status != "queued" for r in self.rows().values())

    @rule(worker=st.sampled_from(WORKERS))
    def cancel_remaining(self, worker: str) -> None:
        jobs.cancel_remaining(self.session, job_id=self.job.id, worker_id=worker, now=self.now)

    @rule(seconds=st.sampled_from([LEASE / 2, LEASE + 1]))
    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    @rule()
    def reconcile(self) -> None:
        before = self.rows()
        jobs.reconcile(self.session, publish=lambda c: None, stale_after_seconds=60,
                       now=self.now)
        for i, r in self.rows().items():
            b = before[i]
            if b.status == "running" and b.lease_expires_at and b.lease_expires_at < self.now:
                assert r.status in ("queued", "failed", "cancelled")
                if r.status == "failed":
                    assert b.attempts >= MAX_ATTEMPTS

    # --- invariants ---------------------------------------------------------------------------

    @invariant()
    def consistent(self) -> None:
        rows = self.rows()
        outputs = dict(self.session.execute(
            select(Output.item_id, func.count()).where(Output.job_id == self.job.id)
            .group_by(Output.item_id)).all())
        for i, r in rows.items():
            live = [w for w in WORKERS if i in self.held[w] and self.owns(r, w, self.held[w][i])
                    and r.lease_expires_at is not None and r.lease_expires_at > self.now]
            assert len(live) <= 1, f"item {i} has live claims by {live}"
            if i in self.terminal:
                assert r.status == self.terminal[i], "a terminal state changed"
            elif r.status in TERMINAL:
                self.terminal[i] = r.status
            assert r.attempts >= self.max_attempts_seen.get(i, 0), "attempts decreased"
            self.max_attempts_seen[i] = r.attempts
            assert r.attempts <= MAX_ATTEMPTS
            assert outputs.get(i, 0) == (1 if r.status == "succeeded" else 0)
            if r.status == "running":
                assert r.owner is not None and r.lease_expires_at is not None
        job = self.session.get(Job, self.job.id, populate_existing=True)
        assert job is not None
        if all(r.status in TERMINAL for r in rows.values()):
            assert job.status in {s.value for s in JOB_TERMINAL}, job.status


def test_job_state_machine(session_factory: sessionmaker[Session]) -> None:
    JobMachine.session_factory = session_factory
    run_state_machine_as_test(
        JobMachine,
        settings=settings(max_examples=25, stateful_step_count=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow],
                          database=None),
    )


def test_state_machine_rows_helper_sees_new_jobs_only(session: Session) -> None:
    """The machine scopes everything to its own job, so examples sharing a DB stay independent."""
    JobMachine.session_factory = sessionmaker(bind=session.get_bind(), expire_on_commit=False)
    m = JobMachine()
    try:
        assert len(m.rows()) == N_ITEMS
        m2 = JobMachine()
        try:
            assert set(m.rows()).isdisjoint(m2.rows())
        finally:
            m2.teardown()
    finally:
        m.teardown()

