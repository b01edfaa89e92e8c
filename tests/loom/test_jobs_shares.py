"""Fair share (loom.jobs.shares): the state a worker reads on PostgreSQL (who waits for the same
model call, what each claimed in the window, the fast lane's share) and the decision made from it."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from loom import jobs, tenants
from loom.jobs import shares
from loom.jobs.limits import Limits
from loom.models import Job, TenantClaim, utcnow

SMALL = 4


def state(session: Session, like: Job, window: float = 10.0) -> shares.ShareState:
    return shares.share_state(session, like=like.id, now=utcnow(), window=window,
                              fast_max_items=SMALL, defaults=Limits())


def decide(st: shares.ShareState, own_items: int, share: float = 0.5) -> shares.Decision:
    return shares.choose(st, own_items=own_items, batch=4, fast_max_items=SMALL,
                         fast_max_share=share)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_claims_are_recorded_and_shared_by_weight(
    session: Session, make_job: Callable[..., Job], tenant_id: str
) -> None:
    b = tenants.ensure_tenant(session, name="b").id
    a_job = make_job(40, chunk_size=40)
    b_job = make_job(40, chunk_size=40, tenant_id=b)
    jobs.claim_items(session, job_id=a_job.id, start=0, end=40, worker_id="w", limit=12,
                     lease_seconds=60)
    n = session.scalar(select(func.sum(TenantClaim.n)).where(TenantClaim.tenant_id == tenant_id))
    assert n == 12
    st = state(session, a_job)
    assert st.own_tenant == tenant_id and set(st.waiting) == {tenant_id, b}
    assert st.waiting[tenant_id].claimed == 12 and st.waiting[b].claimed == 0
    assert st.waiting[tenant_id].running == 12
    # A is 12 items ahead of B (more than a batch of 4): B is served first.
    assert decide(st, own_items=40) == shares.Decision(b, None)
    # B's own message goes on with B.
    assert decide(state(session, b_job), own_items=40) == shares.OWN
    # The fill narrowed to B takes B's items only.
    got = jobs.claim_fill(session, like=a_job.id, worker_id="w", limit=4, lease_seconds=60,
                          now=utcnow(), tenant_id=b)
    assert {i.job_id for i in got} == {b_job.id} and len(got) == 4
    st = state(session, a_job)
    assert st.waiting[b].claimed == 4
    assert decide(st, own_items=40) == shares.Decision(b, None)  # 12 vs 4: B is still owed
    # Weight 4 for A: 12 / 4 = 3 per weight against B's 4: A goes on.
    jobs.set_limits(session, tenant_name=tenants.DEFAULT_TENANT, changes={"weight": 4.0})
    assert decide(state(session, a_job), own_items=40) == shares.OWN


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_the_window_forgets_and_the_reconciler_prunes(
    session: Session, make_job: Callable[..., Job], tenant_id: str
) -> None:
    tenants.ensure_tenant(session, name="b")
    a_job = make_job(40, chunk_size=40)
    jobs.claim_items(session, job_id=a_job.id, start=0, end=40, worker_id="w", limit=12,
                     lease_seconds=60, now=utcnow() - timedelta(seconds=30))
    assert state(session, a_job).waiting[tenant_id].claimed == 0  # outside the 10 s window
    assert shares.prune_claims(session, before=utcnow() - timedelta(seconds=20)) == 1


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_fast_lane_goes_first_within_its_share(
    session: Session, make_job: Callable[..., Job], tenant_id: str
) -> None:
    b = tenants.ensure_tenant(session, name="b").id
    bulk = make_job(40, chunk_size=40)
    small = make_job(1, tenant_id=b)
    st = state(session, bulk)
    assert st.waiting[b].small and not st.waiting[b].bulk
    assert decide(st, own_items=40) == shares.Decision(b, (0, SMALL))
    # The lane took more than its share of the window: bulk work first.
    jobs.claim_items(session, job_id=small.id, start=0, end=1, worker_id="w", limit=1,
                     lease_seconds=60)
    small2 = make_job(2, tenant_id=b)
    st = state(session, small2)
    assert st.total_small == 1 and st.total == 1
    assert decide(st, own_items=2) == shares.Decision(tenant_id, (SMALL + 1, 2**31 - 1))
    assert decide(st, own_items=2, share=1.0) == shares.OWN


def test_choose_alone_ties_and_caps() -> None:
    def w(t: str, claimed: float, weight: float = 1.0, running: int = 0,
          cap: int | None = None) -> shares.Waiting:
        return shares.Waiting(t, weight, claimed, False, True, running, cap)

    alone = shares.ShareState("a", {"a": w("a", 100)}, total=100)
    assert decide(alone, 40) == shares.OWN
    tie = shares.ShareState("a", {"a": w("a", 4), "b": w("b", 0)}, total=4)
    assert decide(tie, 40) == shares.OWN  # within one batch: no flapping
    ahead = shares.ShareState("a", {"a": w("a", 10), "b": w("b", 0)}, total=10)
    assert decide(ahead, 40) == shares.Decision("b", None)
    weighted = shares.ShareState("a", {"a": w("a", 20, weight=2), "b": w("b", 8)}, total=28)
    assert decide(weighted, 40) == shares.OWN  # 10 per weight vs 8
    capped = shares.ShareState("a", {"a": w("a", 0, running=5, cap=5), "b": w("b", 50)})
    assert decide(capped, 40) == shares.Decision("b", None)
    only_capped = shares.ShareState("a", {"a": w("a", 0, running=5, cap=5)})
    assert decide(only_capped, 40).wait
    other_capped = shares.ShareState("a", {"a": w("a", 50), "b": w("b", 0, running=3, cap=3)})
    assert decide(other_capped, 40) == shares.OWN
    # The running count comes from the database with each read and moves with own claims.
    st = shares.ShareState("a", {"a": w("a", 0, running=4, cap=5)})
    st.count("a", 1, small=False)
    assert st.waiting["a"].capped and st.total == 1


def test_queue_place_says_what_is_ahead_and_why(
    session: Session, make_job: Callable[..., Job], tenant_id: str
) -> None:
    b = tenants.ensure_tenant(session, name="b").id
    first = make_job(30)
    second = make_job(2)
    place = jobs.queue_place(session, job=second, defaults=Limits())
    assert place == {"items_ahead": 30, "own_items_ahead": 30, "other_items_ahead": 0,
                     "share": 1.0, "reason": "behind 30 items of the tenant's earlier or more "
                                            "urgent jobs"}
    make_job(50, tenant_id=b)
    place = jobs.queue_place(session, job=second, defaults=Limits())
    # Equal weights: while A's 30 earlier items run, B's get as many.
    assert place["own_items_ahead"] == 30 and place["other_items_ahead"] == 30
    assert place["share"] == 0.5
    alone = jobs.queue_place(session, job=first, defaults=Limits())
    assert alone["items_ahead"] == 0 and "sharing the fleet with 1 other tenant" in alone["reason"]
    jobs.set_limits(session, tenant_name=tenants.DEFAULT_TENANT,
                    changes={"max_running_items": 1})
    jobs.claim_items(session, job_id=first.id, start=0, end=30, worker_id="w", limit=1,
                     lease_seconds=60)
    place = jobs.queue_place(session, job=second, defaults=Limits())
    assert place["reason"] == "tenant at its running limit (1 of 1 items running)"
    assert jobs.queue_place(session, job=first, defaults=Limits()) is None  # it runs


def test_a_dry_message_serves_whoever_is_owed_most() -> None:
    """The message's job has nothing fresh (its worker fills batches from other jobs): the
    small job of another tenant goes first, then the least used tenant, never by age alone."""
    def w(t: str, claimed: float, small: bool = False) -> shares.Waiting:
        return shares.Waiting(t, 1.0, claimed, small, not small, 0, None)

    st = shares.ShareState("b", {"a": w("a", 500), "c": w("c", 40)}, total=540)
    assert decide(st, 1) == shares.Decision("c", None)
    st = shares.ShareState("b", {"a": w("a", 500), "b2": w("b2", 0, small=True)}, total=500)
    assert decide(st, 1) == shares.Decision("b2", (0, SMALL))


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_fast_lane_waiting_is_asked_between_batches(
    session: Session, make_job: Callable[..., Job]
) -> None:
    b = tenants.ensure_tenant(session, name="b").id
    bulk = make_job(40, chunk_size=40)
    assert not shares.fast_lane_waiting(session, like=bulk.id, small=SMALL, now=utcnow())
    small = make_job(2, tenant_id=b)
    assert shares.fast_lane_waiting(session, like=bulk.id, small=SMALL, now=utcnow())
    assert not shares.fast_lane_waiting(session, like=bulk.id, small=1, now=utcnow())
    jobs.claim_items(session, job_id=small.id, start=0, end=2, worker_id="w", limit=2,
                     lease_seconds=60)
    assert not shares.fast_lane_waiting(session, like=bulk.id, small=SMALL, now=utcnow())
