"""Usage metering (loom.jobs.usage) on SQLite and PostgreSQL: items by status, model-seconds
and bytes stored per (UTC day, tenant, model), two tenants and two models, items on either side
of midnight, cache reuses, open items counted now, and the rolling window /metrics reads."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.orm import Session

from loom import jobs, tenants
from loom.errors import InvalidInput, InvalidRequest
from loom.jobs import ItemFailure, ItemResult
from loom.models import Job

D1, D2 = date(2024, 3, 10), date(2024, 3, 11)
MIDNIGHT = datetime(2024, 3, 11)
NOW = datetime(2024, 3, 11, 12, 0)


def at(day: date, hh: int, mm: int = 0, ss: int = 0, us: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hh, mm, ss, us)


def submit(session: Session, tenant_id: str, model: str, n: int, created: datetime) -> Job:
    return jobs.submit_job(
        session, tenant_id=tenant_id, task="caption", model_name=model,
        items=[{"input": {"image_key": f"k/{i}.png"}} for i in range(n)], chunk_size=8,
        max_attempts=3, now=created)


def claim(session: Session, job: Job, when: datetime, limit: int = 100) -> list[Any]:
    return jobs.claim_items(session, job_id=job.id, start=0, end=job.item_count, worker_id="w",
                            limit=limit, lease_seconds=7 * 86400, now=when)


def result(c: Any, *, size: int, timings: dict[str, float], image: bool = True,
           cached_from: int | None = None) -> ItemResult:
    return ItemResult(c.id, "image" if image else "text",
                      text=None if image else "x" * size,
                      storage_key=f"t/jobs/{c.job_id}/outputs/{c.index}.png" if image else None,
                      size_bytes=size, timings=timings, cached_from=cached_from,
                      model_version="1", weights_sha256="ab" * 32, attempt=c.attempts)


def complete(session: Session, results: list[ItemResult], when: datetime) -> None:
    assert jobs.complete_items(session, worker_id="w", results=results, now=when) == len(results)


BATCH4 = {"fetch_ms": 3.0, "decode_ms": 2.0, "infer_ms": 40.0, "infer_batch_size": 4.0,
          "upload_ms": 5.0}


@pytest.fixture
def world(session: Session) -> dict[str, str]:
    """alpha runs loom-shapes (one batch of 4 across midnight) and other-model (one inferred
    text output and one cache reuse); beta runs a training-like item, leaves one item running and
    one queued, and cancels a job. Returns the tenants' ids."""
    alpha = tenants.ensure_tenant(session, name="alpha").id
    beta = tenants.ensure_tenant(session, name="beta").id
    session.commit()

    a = submit(session, alpha, "loom-shapes", 4, at(D1, 10))
    c = claim(session, a, at(D1, 23))
    # One model call for the batch of 4: each output records the call's 40 ms and the size 4.
    complete(session, [result(c[0], size=100, timings=BATCH4),
                       result(c[1], size=100, timings=BATCH4)], at(D1, 23, 59, 59, 999_999))
    complete(session, [result(c[2], size=100, timings=BATCH4)], MIDNIGHT)
    jobs.fail_items(session, worker_id="w", failures=[
        ItemFailure(c[3].id, InvalidInput("unreadable"), attempt=c[3].attempts)],
        backoff_seconds=1, now=at(D2, 0, 0, 1))

    b = submit(session, alpha, "other-model", 2, at(D1, 9))
    cb = claim(session, b, at(D1, 11))
    complete(session, [result(cb[0], size=10, image=False,
                              timings={"infer_ms": 30.0, "infer_batch_size": 1.0})], at(D1, 11))
    first = jobs.outputs_for_items(session, item_ids=[cb[0].id])[cb[0].id]
    complete(session, [result(cb[1], size=10, image=False, timings={"fetch_ms": 1.0},
                              cached_from=first.id)], at(D1, 11, 30))

    t = submit(session, beta, "loom-shapes", 3, at(D1, 8))
    ct = claim(session, t, at(D1, 9), limit=2)
    complete(session, [result(ct[0], size=1000, timings={"train_ms": 5000.0})], at(D1, 13))
    # ct[1] stays running, the third item stays queued.

    d = submit(session, beta, "other-model", 2, at(D2, 8))
    jobs.cancel_job(session, job_id=d.id, now=at(D2, 9))
    session.commit()
    return {"alpha": alpha, "beta": beta}


def items(**counts: int) -> dict[str, int]:
    return {"queued": 0, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0, **counts}


def table(rows: list[Any]) -> list[tuple[Any, ...]]:
    return [(r.day, r.tenant_name, r.model, r.items, round(r.model_seconds, 6), r.bytes_stored)
            for r in rows]


def test_usage_per_day_tenant_and_model(session: Session, world: dict[str, str]) -> None:
    rows = jobs.usage(session, tenant_id=None, since=D1, until=D2, now=NOW)
    assert table(rows) == [
        # 2 of the batch's 4 shares of 40 ms before midnight; the text output is 10 bytes, its
        # cache reuse neither inferred nor stored anything.
        (D1, "alpha", "loom-shapes", items(succeeded=2), 0.02, 200),
        (D1, "alpha", "other-model", items(succeeded=2), 0.03, 10),
        (D1, "beta", "loom-shapes", items(succeeded=1), 5.0, 1000),
        # The item completed at exactly midnight is the next day's; a failure stores nothing.
        (D2, "alpha", "loom-shapes", items(succeeded=1, failed=1), 0.01, 100),
        # Open items count now (NOW is on D2), next to the day's finished ones.
        (D2, "beta", "loom-shapes", items(running=1, queued=1), 0.0, 0),
        (D2, "beta", "other-model", items(cancelled=2), 0.0, 0),
    ]
    assert {r.tenant_id for r in rows if r.tenant_name == "alpha"} == {world["alpha"]}


def test_a_tenant_sees_only_its_own_rows(session: Session, world: dict[str, str]) -> None:
    rows = jobs.usage(session, tenant_id=world["beta"], since=D1, until=D2, now=NOW)
    assert [(r.day, r.tenant_name, r.model) for r in rows] == [
        (D1, "beta", "loom-shapes"), (D2, "beta", "loom-shapes"), (D2, "beta", "other-model")]
    only = jobs.usage(session, tenant_id=world["alpha"], since=D1, until=D2, model="other-model",
                      now=NOW)
    assert table(only) == [(D1, "alpha", "other-model", items(succeeded=2), 0.03, 10)]


def test_day_boundaries(session: Session, world: dict[str, str]) -> None:
    alpha = world["alpha"]
    d1 = jobs.usage(session, tenant_id=alpha, since=D1, until=D1, now=NOW)
    assert [(r.model, r.items["succeeded"], r.bytes_stored) for r in d1] == [
        ("loom-shapes", 2, 200), ("other-model", 2, 10)]
    d2 = jobs.usage(session, tenant_id=alpha, since=D2, until=D2, now=NOW)
    assert [(r.model, r.items) for r in d2] == [("loom-shapes", items(succeeded=1, failed=1))]
    # Open items count on the day it is now: not on a past day, nor on a day still to come.
    later = jobs.usage(session, tenant_id=world["beta"], since=D2, until=D2,
                       now=NOW + timedelta(days=1))
    assert [(r.model, r.items) for r in later] == [("other-model", items(cancelled=2))]
    assert jobs.usage(session, tenant_id=None, since=D1 - timedelta(days=3),
                      until=D1 - timedelta(days=1), now=NOW) == []


def test_a_long_job_counts_on_the_days_its_items_finish(session: Session) -> None:
    """A job created long before the range (still open, or finished within it) is read: only
    jobs that finished before the range are skipped."""
    tid = tenants.ensure_tenant(session, name="gamma").id
    old = submit(session, tid, "loom-shapes", 3, at(D1, 0) - timedelta(days=40))
    c = claim(session, old, at(D1, 0) - timedelta(days=40))
    complete(session, [result(c[0], size=7, timings=BATCH4)], at(D1, 0) - timedelta(days=39))
    complete(session, [result(c[1], size=7, timings=BATCH4)], at(D2, 6))
    rows = jobs.usage(session, tenant_id=tid, since=D1, until=D2, now=NOW)
    assert table(rows) == [(D2, "gamma", "loom-shapes", items(succeeded=1, running=1), 0.01, 7)]
    complete(session, [result(c[2], size=7, timings=BATCH4)], at(D2, 7))  # the job finishes
    assert session.get(Job, old.id, populate_existing=True).status == "succeeded"
    rows = jobs.usage(session, tenant_id=tid, since=D2, until=D2, now=NOW)
    assert table(rows) == [(D2, "gamma", "loom-shapes", items(succeeded=2), 0.02, 14)]
    # The day of the first item, 39 days back, is still there.
    back = at(D1, 0).date() - timedelta(days=39)
    assert table(jobs.usage(session, tenant_id=tid, since=back, until=back, now=NOW)) == [
        (back, "gamma", "loom-shapes", items(succeeded=1), 0.01, 7)]


def test_recent_usage_is_the_last_window_plus_open_items(
    session: Session, world: dict[str, str]
) -> None:
    # The last 24 h before NOW (D1 12:00 .. D2 12:00): alpha's other-model finished at 11:xx on
    # D1 (out); beta's trained item at 13:00 on D1 (in); open items count whatever their age.
    got = [(r.tenant_name, r.model, r.items, round(r.model_seconds, 6), r.bytes_stored)
           for r in jobs.recent_usage(session, seconds=86400, now=NOW)]
    assert got == [
        ("alpha", "loom-shapes", items(succeeded=3, failed=1), 0.03, 300),
        ("beta", "loom-shapes", items(succeeded=1, running=1, queued=1), 5.0, 1000),
        ("beta", "other-model", items(cancelled=2), 0.0, 0),
    ]
    hour = [(r.tenant_name, r.model, r.items)
            for r in jobs.recent_usage(session, seconds=3600, now=NOW)]
    assert hour == [("beta", "loom-shapes", items(running=1, queued=1))]


def test_usage_report_is_the_api_shape(session: Session, world: dict[str, str]) -> None:
    report = jobs.usage_report(session, tenant_id=world["alpha"], since=D1, until=D2, now=NOW)
    assert report["tenant"] == {"id": world["alpha"], "name": "alpha"}
    assert (report["since"], report["until"], report["model"]) == ("2024-03-10", "2024-03-11",
                                                                   None)
    assert report["days"][0] == {"day": "2024-03-10", "model": "loom-shapes",
                                 "items": items(succeeded=2), "model_seconds": 0.02,
                                 "bytes_stored": 200}
    assert report["total"] == {"items": items(succeeded=5, failed=1), "model_seconds": 0.06,
                               "bytes_stored": 310}
    # Defaults: the 30 days ending today (UTC).
    default = jobs.usage_report(session, tenant_id=world["alpha"], now=NOW)
    assert (default["since"], default["until"]) == ("2024-02-11", "2024-03-11")
    assert default["total"] == report["total"]
    assert jobs.usage_report(session, tenant_id=world["alpha"], since=D1, until=D2,
                             now=NOW + timedelta(days=400))["days"] == report["days"]


def test_usage_range_checks() -> None:
    assert jobs.usage_range(since=None, until=None, today=D2) == (D2 - timedelta(days=29), D2)
    assert jobs.usage_range(since=D1, until=None, today=D2) == (D1, D2)
    assert jobs.usage_range(since=None, until=D1, today=D2) == (D1 - timedelta(days=29), D1)
    with pytest.raises(InvalidRequest, match="after until"):
        jobs.usage_range(since=D2, until=D1)
    with pytest.raises(InvalidRequest, match="at most 366"):
        jobs.usage_range(since=D2 - timedelta(days=366), until=D2)
    assert jobs.usage_range(since=D2 - timedelta(days=365), until=D2)[0] == date(2023, 3, 12)
    # Days a timestamp cannot hold (or a default that would run before 1970) are refused or
    # clipped, never an overflow.
    for since, until in ((None, date.max), (date.min, D2), (None, date.min)):
        with pytest.raises(InvalidRequest, match="is not between"):
            jobs.usage_range(since=since, until=until)
    assert jobs.usage_range(since=None, until=date(1970, 1, 5)) == (date(1970, 1, 1),
                                                                    date(1970, 1, 5))
