"""Where a fast-lane job is claimed (worker/claiming.py), on a real PostgreSQL: not by a prefetch,
which runs beside the model and whose batch waits for the one in flight, but by the check
between batches, which runs it next. Also while a process's message job is itself a small job
whose batches are filled from a large one."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from loom import jobs, tenants
from loom.config import Settings
from loom.db import make_engine, make_session_factory
from loom.storage import store_from_settings
from worker.batches import ChunkReport, JobFacts, Scope, StageParts
from worker.claiming import Claimer
from worker.leases import LeaseKeeper
from worker.outages import OutageGuard

FAST = 16


@pytest.fixture
def setup(pg_url: str, tmp_path: Path) -> Iterator[tuple[Claimer, sessionmaker[Session]]]:
    settings = Settings(database_url=pg_url, storage_url=f"file://{tmp_path / 'store'}",
                        home=tmp_path / "home", batch_size=4, chunk_batches=2,
                        fair_share=True, fast_lane_max_items=FAST)
    engine = make_engine(pg_url)
    sf = make_session_factory(engine)
    store = store_from_settings(settings)
    leases = LeaseKeeper(session_factory=sf, worker_id="w", lease_seconds=60,
                         interval_seconds=20)
    with ThreadPoolExecutor(2) as io:
        parts = StageParts(settings=settings, session_factory=sf, store=store, worker_id="w",
                           leases=leases, facts=JobFacts(sf), io=io)
        outages = OutageGuard(session_factory=sf, store=store, worker_id="w", leases=leases)
        yield Claimer(parts, outages=outages, decode_on_model_thread=True), sf
    engine.dispose()


def submit(sf: sessionmaker[Session], tenant: str, n: int) -> str:
    with sf() as s:
        tenant_id = tenants.ensure_tenant(s, name=tenant).id
        return jobs.submit_job(
            s, tenant_id=tenant_id, task="caption", model_name="loom-shapes",
            items=[{"input": {"image_key": f"t/{tenant}/{i}.png"}} for i in range(n)],
            chunk_size=8, max_attempts=3, fast_lane_items=FAST).id


def job_ids(batches: list[Any]) -> set[str]:
    return {item.job_id for batch in batches for item in batch.items}


def scope_of(job_id: str, n: int) -> tuple[Scope, ChunkReport]:
    return (Scope(jobs.Chunk(job_id=job_id, start=0, end=n), time.monotonic() + 5),
            ChunkReport(job_id=job_id, start=0, end=n))


def test_a_prefetch_leaves_a_fast_lane_job_to_the_check_between_batches(
    setup: tuple[Claimer, sessionmaker[Session]],
) -> None:
    claimer, sf = setup
    big = submit(sf, "a", 40)
    small = submit(sf, "b", 1)
    scope, report = scope_of(big, 8)
    # Beside the model: A's own next batches, although B's tenant is owed a claim.
    assert job_ids(claimer.claim(scope, report, prefetch=True)) == {big}
    # Between batches: B's item, as a batch of its own that goes first.
    urgent = claimer.claim_urgent(scope, report)
    assert job_ids(urgent) == {small} and urgent[0].urgent


def test_the_check_between_batches_runs_while_a_small_message_job_fills_from_a_large_one(
    setup: tuple[Claimer, sessionmaker[Session]],
) -> None:
    claimer, sf = setup
    big = submit(sf, "a", 40)
    own = submit(sf, "a", 1)
    scope, report = scope_of(own, 1)
    assert job_ids(claimer.claim(scope, report)) == {own}
    scope.filling = True  # its own item taken, the message's batches come from A's job
    assert job_ids(claimer.claim(scope, report, prefetch=True)) == {big}
    small = submit(sf, "b", 1)
    assert job_ids(claimer.claim_urgent(scope, report)) == {small}
