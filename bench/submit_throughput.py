"""Submit one 100,000-item job on SQLite and on PostgreSQL; print seconds and rows/s side by side,
next to the naive alternative: one Celery message per item carrying the same item (``send_task``
in a loop, which is what ``.delay()`` does) to a real Redis broker.

    .venv/bin/python bench/submit_throughput.py [--items 100000] [--chunk-size 128]
        [--broker redis://127.0.0.1:6379/12] [--celery-items N]

PostgreSQL: LOOM_BENCH_PG_URL (default postgresql+psycopg://root@127.0.0.1:5432/postgres is used
only to CREATE/DROP a scratch database). A missing PostgreSQL or Redis is reported, not fatal.
The Celery messages go to a queue of their own (``loom_bench_<random>``) that nothing consumes;
the bench deletes exactly that queue afterwards. ``--celery-items`` sends only the first N
items and scales the time up (printed as an estimate); the default sends all of them.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from loom import jobs, tenants
from loom.db import make_engine, make_session_factory, upgrade
from loom.models import Item, Outbox

DEFAULT_PG_ADMIN = "postgresql+psycopg://root@127.0.0.1:5432/postgres"


def make_items(n_items: int) -> list[dict[str, Any]]:
    """The items both ways of submitting carry: an input and the metadata that travels back."""
    return [{"input": {"image_key": f"t/jobs/x/inputs/{i:08d}.png"},
             "metadata": {"file": f"{i}.png"}} for i in range(n_items)]


def run(url: str, items: list[dict[str, Any]], chunk_size: int) -> tuple[float, int]:
    upgrade(url)
    engine = make_engine(url)
    n_items = len(items)
    try:
        session_factory = make_session_factory(engine)
        with session_factory() as session:
            tenant = tenants.ensure_tenant(session, name="bench")
            t0 = time.perf_counter()
            job = jobs.submit_job(session, tenant_id=tenant.id, task="caption",
                                  model_name="loom-shapes", items=items,
                                  chunk_size=chunk_size, max_attempts=3)
            elapsed = time.perf_counter() - t0
            n = session.scalar(select(func.count()).where(Item.job_id == job.id))
            chunks = session.scalar(select(func.count()).where(Outbox.job_id == job.id))
            assert n == n_items, (n, n_items)
            assert chunks == -(-n_items // chunk_size)
        return elapsed, n_items
    finally:
        engine.dispose()


def celery_per_item(broker: str, items: list[dict[str, Any]],
                    sample: int) -> tuple[float, int] | None:
    """Publish one task per item, the naive way, each carrying the same item (input and
    metadata) as the Loom submission. Returns (seconds for all items, items sent)."""
    import redis
    from celery import Celery

    queue = f"loom_bench_{secrets.token_hex(4)}"
    try:
        redis.Redis.from_url(broker, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        print(f"redis: unavailable ({exc.__class__.__name__})", file=sys.stderr)
        return None
    app = Celery("loom_bench", broker=broker, set_as_current=False)
    app.conf.update(task_serializer="json", broker_connection_retry_on_startup=False)
    n_items = len(items)
    n = min(sample, n_items)
    try:
        with app.producer_or_acquire() as producer:
            # Warm the connection (and declare the queue) outside the timed loop.
            app.send_task("loom.bench_item", args=["warm", -1, {}], queue=queue,
                          producer=producer)
            t0 = time.perf_counter()
            for i in range(n):
                app.send_task("loom.bench_item", args=["job", i, items[i]],
                              queue=queue, producer=producer)
            elapsed = time.perf_counter() - t0
        sent = int(redis.Redis.from_url(broker).llen(queue))
        assert sent == n + 1, (sent, n + 1)
    finally:
        # Purge only what this run sent: its own queue (and kombu's binding set for it).
        r = redis.Redis.from_url(broker)
        r.delete(queue, f"_kombu.binding.{queue}")
        app.close()
    return elapsed * n_items / n, n


def pg_scratch(admin_url: str) -> tuple[str, str] | None:
    import psycopg

    dsn = admin_url.replace("postgresql+psycopg://", "postgresql://")
    name = f"loom_bench_{secrets.token_hex(4)}"
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        print(f"postgresql: unavailable ({exc.__class__.__name__})", file=sys.stderr)
        return None
    return name, admin_url.rsplit("/", 1)[0] + "/" + name


def pg_drop(admin_url: str, name: str) -> None:
    import psycopg

    dsn = admin_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--broker", default=os.environ.get("LOOM_BENCH_BROKER_URL",
                                                           "redis://127.0.0.1:6379/12"))
    parser.add_argument("--celery-items", type=int, default=None,
                        help="send only this many per-item messages and scale up")
    args = parser.parse_args()

    results: dict[str, tuple[float, int]] = {}
    items = make_items(args.items)
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite"] = run(f"sqlite:///{Path(tmp) / 'bench.db'}", items, args.chunk_size)
    admin = os.environ.get("LOOM_BENCH_PG_URL", DEFAULT_PG_ADMIN)
    scratch = pg_scratch(admin)
    if scratch is not None:
        name, url = scratch
        try:
            results["postgresql"] = run(url, items, args.chunk_size)
        finally:
            pg_drop(admin, name)

    naive = celery_per_item(args.broker, items, args.celery_items or args.items)

    print(f"submit of one {args.items:,}-item job (chunk size {args.chunk_size}; job + items + "
          f"outbox in one transaction)")
    print(f"{'mode':<34}{'seconds':>10}{'items/s':>14}")
    for db, (seconds, n) in results.items():
        print(f"{'loom submit_job, ' + db:<34}{seconds:>10.2f}{n / seconds:>14,.0f}")
    if naive is not None:
        seconds, sent = naive
        label = "celery send_task per item" + ("" if sent == args.items else " (est.)")
        print(f"{label:<34}{seconds:>10.2f}{args.items / seconds:>14,.0f}")
    if len(results) == 2:
        ratio = results["postgresql"][0] / results["sqlite"][0]
        print(f"postgresql / sqlite time ratio: {ratio:.2f}")
    if naive is not None:
        for db, (seconds, _) in results.items():
            print(f"per-item celery / loom submit on {db}: {naive[0] / seconds:.1f}x")


if __name__ == "__main__":
    main()
