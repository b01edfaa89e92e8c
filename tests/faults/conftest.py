"""The fault suite's stack (one per session): its OWN redis-server, PostgreSQL cluster and
moto_server (so scenarios may stop, kill, flush and restart them), the API served in-process,
a loopback trap server, and two real Celery workers running the real model on CPU.

Short leases, so that failures show within seconds: lease 10 s, heartbeat 2 s, reconcile every
2 s, stale chunk 8 s, 3 attempts (shorter than issue 13's 20/5/5/20/3)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from faults_checks import TIMINGS, Stack
from faults_services import MotoServer, PostgresCluster, RedisServer, TrapServer, Worker
from fixtures_worker import loom_env, require_model, serve



@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from api.main import create_app
    from loom import db, tenants
    from loom.config import Settings
    from loom.storage import store_from_settings

    require_model()
    for var, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(var, value)
    tmp = tmp_path_factory.mktemp("faults")
    redis = RedisServer(tmp)
    pg = PostgresCluster(tmp)
    moto = MotoServer(tmp)
    trap = TrapServer()
    workers: list[Worker] = []
    app: Any = None
    engine: Any = None
    try:
        redis.start()
        pg.start()
        pg.create_database("loom")
        moto.start()
        bucket = f"loom-faults-{secrets.token_hex(4)}"
        moto.create_bucket(bucket)
        db.upgrade(pg.url)
        common: dict[str, Any] = dict(
            home=tmp / "home", database_url=pg.url, broker_url=redis.url,
            storage_url=f"s3://{bucket}/f", s3_endpoint_url=moto.endpoint, batch_size=8,
            chunk_batches=4, visibility_timeout_seconds=600, task_time_limit_seconds=300,
            fetch_timeout_seconds=3, **TIMINGS,
        )
        settings = Settings(**common, auth="on")
        engine = db.make_engine(pg.url)
        factory = db.make_session_factory(engine)
        keys: dict[str, str] = {}
        tenant_ids: dict[str, str] = {}
        with factory() as s:
            for name in ("alpha", "beta"):
                key, secret = tenants.create_api_key(s, tenant_name=name)
                keys[name], tenant_ids[name] = secret, key.tenant_id
        env = loom_env(**common, device="cpu")
        env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(Path(__file__).parent)])
        for name in ("f1", "f2"):
            w = Worker(name, env, tmp)
            w.start()
            workers.append(w)
        app = create_app(settings)
        with serve(app) as url:
            stack = Stack(url=url, settings=settings, session_factory=factory,
                          store=store_from_settings(settings), keys=keys, tenant_ids=tenant_ids,
                          redis=redis, pg=pg, moto=moto, bucket=bucket, trap=trap,
                          workers=workers, worker_env=env, tmp=tmp)
            stack.wait_for_workers()
            yield stack
    finally:
        for w in workers:
            w.stop()
        if app is not None:
            app.state.runtime.engine.dispose()
        if engine is not None:
            engine.dispose()
        trap.close()
        moto.stop()
        redis.stop()
        pg.stop()
        pg.cleanup()


@pytest.fixture
def scenario(stack: Stack, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """Every scenario starts with all services up and every worker alive, and ends with the
    invariants that hold for the whole stack: 0 unexpected 5xx, 0 hits on the trap server."""
    stack.restore()
    hits, errors = len(stack.trap.hits), len(stack.server_errors)
    yield stack
    stack.restore()
    assert stack.server_errors[errors:] == [], "5xx answers (other than 503 during an outage)"
    assert stack.trap.hits[hits:] == [], "requests reached the loopback trap server"
