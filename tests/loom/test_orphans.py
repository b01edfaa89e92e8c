"""loom.orphans: job folders with no job row are swept after a grace period, against a real
LocalStore and a real S3 endpoint (moto_server); and the workers' reconciler runs the sweep."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from loom import storage
from loom.models import Job
from loom.orphans import sweep_orphans
from loom.s3 import S3Store, close_clients
from loom.storage import LocalStore, Store


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "local":
        yield LocalStore(tmp_path / "store")
        return
    bucket_url = request.getfixturevalue("s3_bucket")
    endpoint = request.getfixturevalue("s3_endpoint")
    try:
        yield S3Store.from_url(bucket_url, endpoint_url=endpoint, max_pool_connections=4)
    finally:
        close_clients()


def _keys(store: Store) -> set[str]:
    return {k for k, _ in store.list_objects("")}


def _layout(store: Store, make_job: Callable[..., Job], tenant_id: str) -> dict[str, str]:
    """A real job with its stored input; an orphaned job folder (input + output); a caller's own
    upload outside any job folder; the readiness probe's object."""
    job = make_job(1)
    live = storage.input_key(tenant_id, job.id, 0, "png")
    orphan_in = storage.input_key(tenant_id, "f" * 32, 0, "png")
    orphan_out = storage.output_key(tenant_id, "f" * 32, 3, "png")
    upload = f"{tenant_id}/uploads/cat.png"
    for key in (live, orphan_in, orphan_out, upload, "_loom/readyz"):
        store.put(key, b"bytes of " + key.encode(), "image/png")
    return {"live": live, "orphan_in": orphan_in, "orphan_out": orphan_out, "upload": upload}


def test_sweep_deletes_only_old_objects_of_missing_jobs(
    store: Store, session: Session, make_job: Callable[..., Job], tenant_id: str
) -> None:
    keys = _layout(store, make_job, tenant_id)
    before = _keys(store)
    # Inside the grace period: a submission may be storing inputs for a row not committed yet.
    assert sweep_orphans(session, store, grace_seconds=3600) == 0
    assert _keys(store) == before
    later = datetime.now(timezone.utc) + timedelta(hours=2)
    assert sweep_orphans(session, store, grace_seconds=3600, now=later) == 2
    assert _keys(store) == before - {keys["orphan_in"], keys["orphan_out"]}
    assert list(store.list_objects(f"{tenant_id}/jobs/{'f' * 32}/")) == []
    assert store.get(keys["live"]) == b"bytes of " + keys["live"].encode()
    assert sweep_orphans(session, store, grace_seconds=3600, now=later) == 0  # idempotent


def test_reconciler_runs_the_sweep(
    store: Store, session_factory: sessionmaker[Session], session: Session,
    make_job: Callable[..., Job], tenant_id: str,
) -> None:
    from worker.reconciler import Reconciler

    keys = _layout(store, make_job, tenant_id)
    session.commit()
    published: list[Any] = []
    rec = Reconciler(session_factory=session_factory, publish=published.append,
                     interval_seconds=60, stale_after_seconds=60, store=store,
                     sweep_interval_seconds=0.01, orphan_grace_seconds=0.01)
    time.sleep(1.1)  # S3 LastModified has one-second resolution
    rec.run_once()
    assert rec.swept == 2
    remaining = _keys(store)
    assert keys["orphan_in"] not in remaining and keys["orphan_out"] not in remaining
    assert {keys["live"], keys["upload"]} <= remaining
