"""Queries (tenant scoping, cursor pagination, progress, streamed results, lineage) and API keys,
on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from loom import jobs, tenants
from loom.errors import InvalidInput, InvalidRequest, NotFound
from loom.jobs import ItemFailure, ItemResult
from loom.models import ApiKey, Job, utcnow


def run_all(session: Session, job: Job, *, fail: frozenset[int] = frozenset(),
            now: datetime | None = None) -> None:
    cs = jobs.claim_items(session, job_id=job.id, start=0, end=job.item_count, worker_id="w",
                          limit=job.item_count, lease_seconds=60, now=now)
    jobs.complete_items(session, worker_id="w", now=now, results=[
        ItemResult(c.id, "text", text=f"caption {c.index}", model_version="1",
                   weights_sha256="f" * 64, input_sha256="e" * 64)
        for c in cs if c.index not in fail])
    jobs.fail_items(session, worker_id="w", backoff_seconds=0, now=now, failures=[
        ItemFailure(c.id, InvalidInput("bad")) for c in cs if c.index in fail])


def test_get_job_is_tenant_scoped(session: Session, make_job: Callable[..., Job]) -> None:
    job = make_job(1)
    other = tenants.ensure_tenant(session, name="other")
    assert jobs.get_job(session, job_id=job.id, tenant_id=job.tenant_id).id == job.id
    with pytest.raises(NotFound):
        jobs.get_job(session, job_id=job.id, tenant_id=other.id)
    with pytest.raises(NotFound):
        jobs.get_job(session, job_id="nope")
    with pytest.raises(NotFound):
        jobs.list_items(session, job_id=job.id, tenant_id=other.id)
    with pytest.raises(NotFound):
        list(jobs.iter_results(session, job_id=job.id, tenant_id=other.id))


def test_list_jobs_pages_newest_first_per_tenant(
    session: Session, make_job: Callable[..., Job], tenant_id: str
) -> None:
    t0 = utcnow()
    made = [make_job(1, now=t0 + timedelta(seconds=i // 2)) for i in range(7)]  # ties on time
    other = tenants.ensure_tenant(session, name="other")
    make_job(1, tenant_id=other.id)
    seen: list[str] = []
    cursor = None
    while True:
        page = jobs.list_jobs(session, tenant_id=tenant_id, limit=3, cursor=cursor)
        seen += [j.id for j in page.items]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    expected = [j.id for j in sorted(made, key=lambda j: (j.created_at, j.id), reverse=True)]
    assert seen == expected
    assert len(jobs.list_jobs(session, limit=100).items) == 8
    assert jobs.list_jobs(session, tenant_id=tenant_id, status="succeeded").items == []
    with pytest.raises(InvalidRequest):
        jobs.list_jobs(session, cursor="garbage!")


def test_list_items_pages_by_index_and_filters(
    session: Session, make_job: Callable[..., Job]
) -> None:
    job = make_job(7)
    run_all(session, job, fail=frozenset({2, 5}))
    page = jobs.list_items(session, job_id=job.id, limit=3)
    assert [i.index for i in page.items] == [0, 1, 2] and page.next_cursor
    page2 = jobs.list_items(session, job_id=job.id, limit=3, cursor=page.next_cursor)
    assert [i.index for i in page2.items] == [3, 4, 5]
    last = jobs.list_items(session, job_id=job.id, limit=3, cursor=page2.next_cursor)
    assert [i.index for i in last.items] == [6] and last.next_cursor is None
    failed = jobs.list_items(session, job_id=job.id, status="failed")
    assert [i.index for i in failed.items] == [2, 5]


def test_job_progress_counts_rate_and_eta(
    session: Session, make_job: Callable[..., Job]
) -> None:
    job = make_job(10)
    t0 = utcnow()
    p = jobs.job_progress(session, job_id=job.id)
    assert (p.total, p.done, p.items_per_second, p.count("queued")) == (10, 0, None, 10)
    cs = jobs.claim_items(session, job_id=job.id, start=0, end=10, worker_id="w", limit=10,
                          lease_seconds=60, now=t0)
    # 4 items succeed 2 s after the job started: 2 items/s, 6 items left -> ETA 3 s.
    jobs.complete_items(session, worker_id="w", now=t0 + timedelta(seconds=2),
                        results=[ItemResult(c.id, "text", text="x") for c in cs[:4]])
    p = jobs.job_progress(session, job_id=job.id)
    assert p.counts["succeeded"] == 4 and p.counts["running"] == 6 and p.done == 4
    assert p.items_per_second == pytest.approx(2.0)
    assert p.eta_seconds == pytest.approx(3.0)
    assert p.status == "running"


def test_iter_results_streams_in_index_order(
    session: Session, make_job: Callable[..., Job]
) -> None:
    job = make_job(25)
    run_all(session, job, fail=frozenset({3}))
    rows = list(jobs.iter_results(session, job_id=job.id, page_size=4))
    assert [item.index for item, _ in rows] == list(range(25))
    assert rows[3][1] is None and rows[3][0].error_code == "invalid_input"
    assert rows[4][1] is not None and rows[4][1].text == "caption 4"
    # Pages are released as they go: the session does not hold the whole job.
    assert len(session.identity_map) < 25


def test_item_lineage_walks_the_parent_chain(
    session: Session, make_job: Callable[..., Job]
) -> None:
    grandparent = make_job(1, task="generate")
    parent = make_job(1, parent_job_id=grandparent.id)
    child = make_job(2, parent_job_id=parent.id, params={"beam": 3})
    run_all(session, child)
    item_id = jobs.list_items(session, job_id=child.id).items[1].id
    lineage = jobs.item_lineage(session, item_id=item_id, tenant_id=child.tenant_id)
    assert lineage["item"]["index"] == 1 and lineage["item"]["status"] == "succeeded"
    out = lineage["output"]
    assert out["text"] == "caption 1" and out["params"] == {"beam": 3}
    assert (out["attempt"], out["worker_id"], out["model_name"]) == (1, "w", "loom-shapes")
    assert out["weights_sha256"] == "f" * 64 and out["input_sha256"] == "e" * 64
    assert [e["kind"] for e in lineage["events"]] == ["claimed", "succeeded"]
    assert lineage["job"]["id"] == child.id
    assert [p["id"] for p in lineage["parents"]] == [parent.id, grandparent.id]
    other = tenants.ensure_tenant(session, name="other")
    with pytest.raises(NotFound):
        jobs.item_lineage(session, item_id=item_id, tenant_id=other.id)
    with pytest.raises(NotFound):
        make_job(1, parent_job_id=child.id, tenant_id=other.id)  # no cross-tenant parents


def test_api_keys_hash_only_and_authenticate(session: Session) -> None:
    key, secret = tenants.create_api_key(session, tenant_name="acme", name="ci")
    assert secret.startswith("loom_") and len(secret) > 40
    stored = session.scalar(select(ApiKey).where(ApiKey.id == key.id))
    assert stored is not None and secret not in (stored.key_hash, stored.prefix)
    assert stored.key_hash == tenants.hash_secret(secret)
    tenant = tenants.authenticate(session, secret=secret)
    assert tenant is not None and tenant.name == "acme"
    tampered = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    assert tenants.authenticate(session, secret=tampered) is None
    assert tenants.authenticate(session, secret="nope") is None
    assert tenants.authenticate(session, secret="") is None
    _, second = tenants.create_api_key(session, tenant_name="acme")
    assert tenants.ensure_tenant(session, name="acme").id == tenant.id  # get-or-create
    tenants.revoke_api_key(session, key_id=key.id)
    assert tenants.authenticate(session, secret=secret) is None
    assert tenants.authenticate(session, secret=second) is not None
