"""Fair share between tenants with a real ``loom worker`` on PostgreSQL + Redis + S3: a one-item
job of another tenant does not wait behind a large job, and two large jobs share the worker by
their tenants' weights (loom.jobs.shares, worker/fair_share.py). Counted, not timed: what each
tenant had finished when the other's job ended."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import func, select

from worker_helpers import item_counts, tenant_id, wait_for_job

pytestmark = pytest.mark.slow

PROMPTS = ["a small red circle", "a large blue square left of a small green triangle"]


@pytest.fixture(scope="module")
def worker_app() -> str:
    from fixtures_worker import require_model

    require_model()
    return "worker.app"


def submit(cluster: Any, tenant: str, n: int, offset: int = 0) -> str:
    from loom import jobs

    with cluster.session_factory() as s:
        job = jobs.submit_job(
            s, tenant_id=tenant, task="generate", model_name="loom-shapes",
            items=[{"input": {"prompt": PROMPTS[i % 2], "seed": offset + i}} for i in range(n)],
            chunk_size=32, max_attempts=3, fast_lane_items=cluster.settings.fast_lane_max_items)
        jobs.publish_pending(s, publish=cluster.publish, job_id=job.id)
        return job.id


def done(cluster: Any, job_id: str) -> int:
    return item_counts(cluster.session_factory, job_id).get("succeeded", 0)


def test_a_one_item_job_does_not_wait_behind_a_large_one(cluster: Any, worker_app: str) -> None:
    a, b = tenant_id(cluster.session_factory, "a"), tenant_id(cluster.session_factory, "b")
    cluster.pool.start("w1", app=worker_app)
    big = submit(cluster, a, 1200)
    deadline = time.monotonic() + 120
    while done(cluster, big) < 40:  # the worker is well into A's job
        assert time.monotonic() < deadline, cluster.pool.logs()
        time.sleep(0.1)
    small = [submit(cluster, b, 1, offset=10_000 + k) for k in range(3)]
    for job_id in small:
        assert wait_for_job(cluster.session_factory, job_id, timeout=120,
                            pool=cluster.pool) == "succeeded"
    left = 1200 - done(cluster, big)
    # B's three jobs ended while most of A's was still to do (without fair share, B's
    # messages queue behind A's chunks and its lingering worker).
    assert left > 600, left
    assert wait_for_job(cluster.session_factory, big, timeout=240, pool=cluster.pool) \
        == "succeeded"


def test_two_large_jobs_share_by_weight(cluster: Any, worker_app: str) -> None:
    from loom import jobs
    from loom.models import TenantClaim

    a, b = tenant_id(cluster.session_factory, "a"), tenant_id(cluster.session_factory, "b")
    with cluster.session_factory() as s:
        jobs.set_limits(s, tenant_name="a", changes={"weight": 2.0})
    job_a = submit(cluster, a, 900)  # A first: without fair share it would run alone
    job_b = submit(cluster, b, 900, offset=5000)
    cluster.pool.start("w1", app=worker_app)
    deadline = time.monotonic() + 240
    while done(cluster, job_a) + done(cluster, job_b) < 450:
        assert time.monotonic() < deadline, cluster.pool.logs()
        time.sleep(0.1)
    with cluster.session_factory() as s:
        claimed = dict(s.execute(select(TenantClaim.tenant_id, func.sum(TenantClaim.n))
                                 .group_by(TenantClaim.tenant_id)).all())
    ratio = claimed[a] / claimed[b]
    assert 1.5 <= ratio <= 2.6, claimed  # 2:1, give or take the batches in flight
    for job_id in (job_a, job_b):
        assert wait_for_job(cluster.session_factory, job_id, timeout=240,
                            pool=cluster.pool) == "succeeded"
