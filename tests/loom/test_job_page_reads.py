"""loom.jobs.page (the job page's reads) and loom.jobs.stream on SQLite and PostgreSQL: the
throughput buckets' SQL epoch arithmetic, failures grouped by code, stage timings, samples,
tenant scoping, and the event stream's resume from Last-Event-ID."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from jobs_helpers import claim
from sqlalchemy.orm import Session

from loom import jobs, tenants
from loom.errors import InputMissing, InvalidInput, NotFound
from loom.jobs import ItemFailure, ItemResult, page, stream
from loom.models import Job, utcnow


def test_page_reads(session: Session, make_job: Callable[..., Job]) -> None:
    job = make_job(10)
    t0 = utcnow()
    items = claim(session, job, "w", limit=10)
    results = [ItemResult(c.id, "text", text=f"cap {c.index}", model_version="1",
                          weights_sha256="0" * 64,
                          timings={"fetch_ms": 2.0, "decode_ms": 1.0, "infer_ms": 40.0,
                                   "infer_batch_size": 4.0})
               for c in items[:6]]
    jobs.complete_items(session, worker_id="w", results=results[:3],
                        now=t0 + timedelta(seconds=1))
    jobs.complete_items(session, worker_id="w", results=results[3:],
                        now=t0 + timedelta(seconds=3))
    jobs.fail_items(session, worker_id="w", backoff_seconds=0, failures=[
        ItemFailure(items[6].id, InvalidInput("bad png 6")),
        ItemFailure(items[7].id, InvalidInput("bad png 7")),
        ItemFailure(items[8].id, InputMissing("gone 8"))])
    buckets = page.throughput(session, job_id=job.id, buckets=4)
    assert len(buckets) == 4 and sum(b["rate"] for b in buckets) > 0
    width = buckets[0]["t"]
    assert round(sum(b["rate"] * width for b in buckets)) == 6  # every success in a bucket
    groups = page.failures(session, job_id=job.id)
    assert [(g["code"], g["count"]) for g in groups] == [("invalid_input", 2),
                                                         ("input_missing", 1)]
    assert [e["message"] for e in groups[0]["examples"]] == ["bad png 6", "bad png 7"]
    stages = page.stage_timings(session, job_id=job.id)
    assert stages == {"read": 2.0, "decode": 1.0, "infer": 10.0}
    rows = page.samples(session, job_id=job.id, limit=4)
    assert [r["output"]["text"] for r in rows] == ["cap 0", "cap 1", "cap 2", "cap 3"]
    other = tenants.ensure_tenant(session, name="someone-else")
    session.commit()
    with pytest.raises(NotFound):
        page.failures(session, job_id=job.id, tenant_id=other.id)
    with pytest.raises(NotFound):
        page.item_image_key(session, item_id=items[0].id, tenant_id=other.id, which="input")


def test_stream_replays_failures_and_resumes(session: Session,
                                             make_job: Callable[..., Job]) -> None:
    job = make_job(3)
    a, b, c = claim(session, job, "w", limit=3)
    state = stream.StreamState()
    first = stream.poll(session, job_id=job.id, tenant_id=job.tenant_id, state=state, now=0.0)
    assert [e["event"] for e in first] == ["started", "progress"]
    jobs.fail_items(session, worker_id="w", backoff_seconds=0,
                    failures=[ItemFailure(a.id, InvalidInput("broken"))])
    # Throttled: a progress event waits min_interval, the failure does not.
    second = stream.poll(session, job_id=job.id, tenant_id=job.tenant_id, state=state, now=0.1)
    assert [e["event"] for e in second] == ["item_failed"]
    assert second[0]["data"]["code"] == "invalid_input" and second[0]["data"]["index"] == 0
    jobs.fail_items(session, worker_id="w", backoff_seconds=0, failures=[
        ItemFailure(b.id, InvalidInput("broken")), ItemFailure(c.id, InvalidInput("broken"))])
    last = stream.poll(session, job_id=job.id, tenant_id=job.tenant_id, state=state, now=0.2)
    assert [e["event"] for e in last] == ["item_failed", "item_failed", "progress", "finished"]
    assert last[-1]["data"]["status"] == "failed"
    # Resume after the first failure: the other two failures, progress, finished.
    resumed = stream.StreamState.resume(second[0]["id"])
    again = stream.poll(session, job_id=job.id, tenant_id=job.tenant_id, state=resumed, now=9)
    assert [e["event"] for e in again] == ["item_failed", "item_failed", "progress", "finished"]
    assert "started" not in [e["event"] for e in again]
    with pytest.raises(NotFound):
        stream.poll(session, job_id=job.id, tenant_id="x" * 32, state=stream.StreamState(),
                    now=0.0)
