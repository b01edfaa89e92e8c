"""Fixtures for the worker tests: a per-test cluster (PostgreSQL DB, Redis DB 15, moto bucket,
worker subprocesses) and the embedded setup (SQLite + LocalStore)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from worker_helpers import MODEL, WorkerPool, worker_env


@dataclass
class Cluster:
    """One test's services (PostgreSQL DB, Redis DB 15, moto bucket) and its workers."""

    settings: Any
    session_factory: Any
    store: Any
    pool: WorkerPool
    publish: Callable[[Any], None]
    env: dict[str, str]


@pytest.fixture
def cluster(
    pg_url: str, redis_url: str, s3_bucket: str, s3_endpoint: str, tmp_path: Path
) -> Iterator[Cluster]:
    from loom.config import Settings
    from loom.db import make_engine, make_session_factory
    from loom.storage import store_from_settings
    from worker.app import make_celery, make_publisher

    env = worker_env(
        database_url=pg_url, broker_url=redis_url, storage_url=s3_bucket, s3_endpoint=s3_endpoint,
        home=tmp_path / "home",
    )
    settings = Settings(
        home=tmp_path / "home", database_url=pg_url, broker_url=redis_url,
        storage_url=s3_bucket, s3_endpoint_url=s3_endpoint, batch_size=8, chunk_batches=4,
    )
    engine = make_engine(pg_url)
    celery_app = make_celery(settings)
    pool = WorkerPool(env, tmp_path)
    try:
        yield Cluster(
            settings=settings,
            session_factory=make_session_factory(engine),
            store=store_from_settings(settings),
            pool=pool,
            publish=make_publisher(celery_app),
            env=env,
        )
    finally:
        pool.stop()
        celery_app.close()
        engine.dispose()


@pytest.fixture(scope="session")
def shapes_model() -> Any:
    """The real model, shipped weights, on CPU."""
    import torch

    from fixtures_worker import require_model
    from pipeline import registry

    require_model()
    torch.set_num_threads(1)
    return registry.load(MODEL, device="cpu")


@pytest.fixture
def embedded(sqlite_url: str, make_settings: Any, tmp_path: Path) -> Iterator[Any]:
    """(settings, session_factory, LocalStore) on a migrated SQLite file."""
    from loom.db import make_engine, make_session_factory
    from loom.storage import LocalStore

    eng = make_engine(sqlite_url)
    settings = make_settings(
        database_url=sqlite_url, storage_url=f"file://{tmp_path / 'store'}", batch_size=4,
        chunk_batches=2, lease_seconds=30, heartbeat_seconds=5, retry_backoff_seconds=0,
    )
    try:
        yield settings, make_session_factory(eng), LocalStore(str(tmp_path / "store"))
    finally:
        eng.dispose()
