"""Tenant limits (loom.jobs.limits), checked where a job is submitted, on SQLite and PostgreSQL:
each refusal names the limit and the use, leaves nothing behind, and comes at the limit exactly."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from loom import jobs, tenants
from loom.errors import InvalidRequest, JobTooLarge, LimitExceeded, NotFound
from loom.jobs.limits import Limits
from loom.models import Item, Job, Outbox, Tenant, utcnow


def counts(session: Session) -> tuple[int, int, int]:
    session.commit()
    return tuple(int(session.scalar(select(func.count()).select_from(t)) or 0)  # type: ignore[return-value]
                 for t in (Job, Item, Outbox))


def test_open_items_limit_refuses_the_job_that_goes_over_exactly(
    session: Session, make_job: Callable[..., Job]
) -> None:
    limits = Limits(max_queued_items=10)
    make_job(6, limits=limits)
    make_job(4, limits=limits)  # 10: at the limit, accepted
    before = counts(session)
    with pytest.raises(LimitExceeded) as ei:
        make_job(1, limits=limits)
    assert "open (queued or running) items" in ei.value.message
    assert "limit of 10" in ei.value.message and "(10 open now)" in ei.value.message
    assert ei.value.http_status == 429 and ei.value.retry_after >= 1
    assert counts(session) == before  # nothing half-accepted


def test_finished_items_free_the_queue(
    session: Session, make_job: Callable[..., Job]
) -> None:
    limits = Limits(max_queued_items=4)
    first = make_job(4, limits=limits)
    claimed = jobs.claim_items(session, job_id=first.id, start=0, end=4, worker_id="w",
                               limit=2, lease_seconds=60)
    jobs.complete_items(session, worker_id="w", results=[
        jobs.ItemResult(c.id, "text", text="x", model_version="1", weights_sha256="ab" * 32,
                        timings={}, attempt=c.attempts) for c in claimed])
    make_job(2, limits=limits)  # two finished: two fit again


def test_generated_items_are_counted_as_they_come(
    session: Session, make_job: Callable[..., Job]
) -> None:
    def rows() -> Iterator[dict[str, Any]]:
        for i in range(7):
            yield {"input": {"image_key": f"k/{i}.png"}}

    with pytest.raises(LimitExceeded):
        make_job(items=rows(), limits=Limits(max_queued_items=6))
    assert counts(session) == (0, 0, 0)


def test_per_job_size_is_413_not_retryable(
    session: Session, make_job: Callable[..., Job]
) -> None:
    make_job(5, limits=Limits(max_items_per_job=5))
    with pytest.raises(JobTooLarge) as ei:
        make_job(6, limits=Limits(max_items_per_job=5))
    assert ei.value.http_status == 413 and "limit of 5 items per job" in ei.value.message


def test_submissions_per_minute_with_retry_after_from_the_oldest(
    session: Session, make_job: Callable[..., Job]
) -> None:
    limits = Limits(submissions_per_minute=3)
    t0 = utcnow()
    for k in range(3):
        make_job(1, limits=limits, now=t0 + timedelta(seconds=10 * k))
    with pytest.raises(LimitExceeded) as ei:
        make_job(1, limits=limits, now=t0 + timedelta(seconds=25))
    assert "3 submissions per minute" in ei.value.message
    assert ei.value.retry_after == pytest.approx(35, abs=1)  # t0 + 60 - (t0 + 25)
    make_job(1, limits=limits, now=t0 + timedelta(seconds=61))  # the first left the window


def test_idempotent_replay_is_not_a_new_submission(
    session: Session, make_job: Callable[..., Job]
) -> None:
    limits = Limits(submissions_per_minute=1)
    first = make_job(1, limits=limits, idempotency_key="k1")
    assert make_job(1, limits=limits, idempotency_key="k1").id == first.id


def test_tenant_overrides_win_over_defaults_and_reset(
    session: Session, make_job: Callable[..., Job], tenant_id: str
) -> None:
    name = session.get(Tenant, tenant_id).name  # type: ignore[union-attr]
    jobs.set_limits(session, tenant_name=name, changes={"max_queued_items": 2, "weight": 3.0})
    with pytest.raises(LimitExceeded):
        make_job(3, limits=Limits(max_queued_items=100))
    (row,) = jobs.list_limits(session, defaults=Limits(max_queued_items=100), now=utcnow(),
                              tenant_name=name)
    assert row.limits.max_queued_items == 2 and row.limits.weight == 3.0
    assert row.overrides == {"max_queued_items": 2, "weight": 3.0}
    jobs.set_limits(session, tenant_name=name, changes={}, reset=True)
    make_job(3, limits=Limits(max_queued_items=100))
    (row,) = jobs.list_limits(session, defaults=Limits(), now=utcnow(), tenant_name=name)
    assert row.overrides == {} and row.use.open_items == 3 and row.use.submissions_last_minute == 1
    with pytest.raises(InvalidRequest, match="weight must be > 0"):
        jobs.set_limits(session, tenant_name=name, changes={"weight": 0})
    with pytest.raises(InvalidRequest, match="unknown limit"):
        jobs.set_limits(session, tenant_name=name, changes={"max_cats": 1})
    with pytest.raises(NotFound):
        jobs.set_limits(session, tenant_name="nobody", changes={"weight": 1.0})


def test_other_tenants_do_not_count(
    session: Session, make_job: Callable[..., Job]
) -> None:
    other = tenants.ensure_tenant(session, name="other").id
    make_job(5, tenant_id=other, limits=Limits(max_queued_items=5))
    make_job(5, limits=Limits(max_queued_items=5))
