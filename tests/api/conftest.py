"""API test fixtures.

``stack`` (one per module): PostgreSQL, Redis, S3 (moto_server), the API served by uvicorn in a
thread, and a real ``celery -A worker.app worker`` subprocess running the real model.
``local_app``: the API alone on SQLite + a local store, publishing into a list (no broker).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api_helpers import METRICS_TOKEN, REDIS_TEST_URL, LocalApp, ServedApp, Stack, served_app_with
from fixtures_worker import WorkerProcess, loom_env, missing, require_model, serve

def _redis_ready() -> None:
    import redis

    client = redis.Redis.from_url(REDIS_TEST_URL, socket_connect_timeout=2)
    try:
        client.flushdb()
    except redis.exceptions.ConnectionError:
        missing(f"Redis at {REDIS_TEST_URL}")
    finally:
        client.close()


@pytest.fixture(scope="module")
def stack(
    pg_url_module: str, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    import boto3

    from api.main import create_app
    from loom import tenants
    from loom.config import Settings
    from loom.db import make_engine, make_session_factory
    from loom.storage import store_from_settings

    require_model()
    _redis_ready()
    tmp = tmp_path_factory.mktemp("stack")
    bucket = f"loom-api-{secrets.token_hex(5)}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    s3.close()
    common: dict[str, Any] = dict(
        home=tmp / "home", database_url=pg_url_module, broker_url=REDIS_TEST_URL,
        storage_url=f"s3://{bucket}/t", s3_endpoint_url=s3_endpoint, batch_size=8,
        chunk_batches=4, retry_backoff_seconds=0.2, visibility_timeout_seconds=600,
        task_time_limit_seconds=300,
    )
    settings = Settings(**common, auth="on", max_items_per_request=300,
                        max_body_bytes=4_000_000, max_text_chars=200,
                        metrics_token=METRICS_TOKEN)
    engine = make_engine(pg_url_module)
    factory = make_session_factory(engine)
    keys: dict[str, str] = {}
    tenant_ids: dict[str, str] = {}
    with factory() as s:
        for name in ("alpha", "beta"):
            key, secret = tenants.create_api_key(s, tenant_name=name)
            keys[name], tenant_ids[name] = secret, key.tenant_id
    env = loom_env(**common, device="cpu", lease_seconds=20, heartbeat_seconds=2,
                   reconcile_interval_seconds=1, stale_chunk_seconds=10,
                   fetch_timeout_seconds=3)
    worker = WorkerProcess(env, tmp / "worker.log")
    app = create_app(settings)
    try:
        with serve(app) as url:
            yield Stack(url, settings, factory, store_from_settings(settings), keys,
                        tenant_ids, worker)
    finally:
        worker.stop()
        app.state.runtime.engine.dispose()
        engine.dispose()


@pytest.fixture
def local_app(tmp_path: Path, make_settings: Any) -> Iterator[LocalApp]:
    """The API on a fresh SQLite + local store, auth off; publish() appends to a list."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from loom.db import upgrade

    settings = make_settings(
        database_url=f"sqlite:///{tmp_path / 'api.db'}", storage_url=f"file://{tmp_path / 's'}",
        broker_url="memory://", max_items_per_request=20, max_body_bytes=200_000,
        max_text_chars=100, max_input_bytes=50_000,
    )
    upgrade(settings.database_url)
    published: list[Any] = []
    app = create_app(settings, publish=published.append)
    try:
        with TestClient(app) as client:
            yield LocalApp(client, app, settings, published, app.state.runtime.session_factory)
    finally:
        app.state.runtime.engine.dispose()


@pytest.fixture
def served_app(pg_url: str, tmp_path: Path, make_settings: Any) -> Iterator[ServedApp]:
    """``served_app_with`` the request limits the request tests probe."""
    with served_app_with(pg_url, tmp_path, make_settings, max_items_per_request=50,
                         max_body_bytes=500_000, max_text_chars=100,
                         max_input_bytes=50_000) as app:
        yield app
