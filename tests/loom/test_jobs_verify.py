"""jobs.verify_job: lost and corrupt outputs are found; --repair requeues exactly those items
with a new attempt, keeping the old lineage as an output_lost event."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from loom import jobs
from loom.errors import InvalidState, NotFound
from loom.jobs import ItemResult
from loom.models import Event, Item, Job, Output
from loom.storage import LocalStore, output_key

from jobs_helpers import claim, ok


def _image_result(store: LocalStore, c: jobs.ClaimedItem, tenant: str) -> ItemResult:
    data = f"png bytes of item {c.index}".encode()
    key = output_key(tenant, c.job_id, c.index, "png")
    store.put(key, data, "image/png")
    return ItemResult(c.id, "image", storage_key=key, content_type="image/png",
                      sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data),
                      model_version="1", weights_sha256="ab" * 32, attempt=c.attempts)


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(str(tmp_path / "store"))


def _done_job(session: Session, make_job: Callable[..., Job], store: LocalStore,
              tenant_id: str) -> tuple[Job, list[jobs.ClaimedItem]]:
    job = make_job(6, task="generate", chunk_size=2,
                   items=[{"input": {"prompt": f"p{i}", "seed": i}} for i in range(6)])
    jobs.publish_pending(session, publish=lambda c: None)
    cs = claim(session, job, "w1")
    results = [_image_result(store, c, tenant_id) for c in cs[:5]]
    results.append(ok(cs[5], "text output"))
    assert jobs.complete_items(session, worker_id="w1", results=results, store=store) == 6
    assert jobs.get_job(session, job_id=job.id).status == "succeeded"
    return job, cs


def test_verify_finds_nothing_on_a_healthy_job(
    session: Session, make_job: Callable[..., Job], store: LocalStore, tenant_id: str
) -> None:
    job, _ = _done_job(session, make_job, store, tenant_id)
    report = jobs.verify_job(session, job_id=job.id, store=store, repair=True)
    assert (report.checked, report.ok, report.requeued) == (6, True, 0)
    assert jobs.get_job(session, job_id=job.id).status == "succeeded"


def test_verify_reports_missing_and_corrupt_and_repair_requeues_exactly_those(
    session: Session, make_job: Callable[..., Job], store: LocalStore, tenant_id: str
) -> None:
    job, cs = _done_job(session, make_job, store, tenant_id)
    k1, k3 = (output_key(tenant_id, job.id, i, "png") for i in (1, 3))
    (Path(store.root) / k1).unlink()
    store.put(k3, b"flipped bits", "image/png")

    report = jobs.verify_job(session, job_id=job.id, store=store)
    assert report.checked == 6 and not report.ok and report.requeued == 0
    assert [(p.index, p.problem) for p in report.problems] == [(1, "missing"), (3, "corrupt")]
    assert report.corrupt[0].actual_sha256 == hashlib.sha256(b"flipped bits").hexdigest()
    assert jobs.get_job(session, job_id=job.id).status == "succeeded"  # a check changes nothing

    report = jobs.verify_job(session, job_id=job.id, store=store, repair=True)
    assert report.requeued == 2
    session.commit()
    assert jobs.get_job(session, job_id=job.id).status == "running"
    items = {i.index: i for i in session.scalars(select(Item).where(Item.job_id == job.id))}
    assert [i for i, it in sorted(items.items()) if it.status == "queued"] == [1, 3]
    assert session.scalar(select(Output).where(Output.item_id == items[1].id)) is None
    lost = list(session.scalars(select(Event).where(Event.job_id == job.id,
                                                    Event.kind == "output_lost")
                                .order_by(Event.item_id)))
    assert [e.error_code for e in lost] == ["output_missing", "output_corrupt"]
    old = json.loads(lost[0].message or "{}")
    assert (old["storage_key"], old["attempt"], old["worker_id"]) == (k1, 1, "w1")
    # The deleted output's success stays in the item's history, as an event row now.
    history = jobs.item_lineage(session, item_id=items[1].id)["events"]
    assert [(e["kind"], e["attempt"], e["worker_id"]) for e in history] == [
        ("claimed", 1, "w1"), ("succeeded", 1, "w1"), ("output_lost", 1, "w1")]
    sent: list[jobs.Chunk] = []
    jobs.publish_pending(session, publish=sent.append)
    assert sorted((c.start, c.end) for c in sent) == [(0, 2), (2, 4)]

    again = claim(session, job, "w2")
    assert sorted(c.index for c in again) == [1, 3]
    assert all(c.attempts == 2 for c in again)  # a new attempt; numbers never repeat
    jobs.complete_items(session, worker_id="w2", store=store,
                        results=[_image_result(store, c, tenant_id) for c in again])
    assert jobs.get_job(session, job_id=job.id).status == "succeeded"
    assert jobs.verify_job(session, job_id=job.id, store=store).ok


def test_verify_respects_tenants_and_cancelled_jobs(
    session: Session, make_job: Callable[..., Job], store: LocalStore, tenant_id: str
) -> None:
    job, _ = _done_job(session, make_job, store, tenant_id)
    with pytest.raises(NotFound):
        jobs.verify_job(session, job_id=job.id, store=store, tenant_id="someone-else")
    other = make_job(1)
    jobs.cancel_job(session, job_id=other.id)
    problem = jobs.OutputProblem(1, 0, "missing", "k", None)
    with pytest.raises(InvalidState):
        jobs.requeue_lost(session, job_id=other.id, problems=[problem])
