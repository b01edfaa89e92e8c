"""Submit one 100,000-item job on SQLite and on PostgreSQL; print seconds and rows/s side by side.

    .venv/bin/python bench/submit_throughput.py [--items 100000] [--chunk-size 128]

PostgreSQL: LOOM_BENCH_PG_URL (default postgresql+psycopg://root@127.0.0.1:5432/postgres is used
only to CREATE/DROP a scratch database). A missing PostgreSQL is reported, not fatal.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import func, select

from loom import jobs, tenants
from loom.db import make_engine, make_session_factory, upgrade
from loom.models import Item, Outbox

DEFAULT_PG_ADMIN = "postgresql+psycopg://root@127.0.0.1:5432/postgres"


def run(url: str, n_items: int, chunk_size: int) -> tuple[float, int]:
    upgrade(url)
    engine = make_engine(url)
    try:
        session_factory = make_session_factory(engine)
        items = [
            {"input": {"image_key": f"t/jobs/x/inputs/{i:08d}.png"},
             "metadata": {"file": f"{i}.png"}}
            for i in range(n_items)
        ]
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
    args = parser.parse_args()

    results: dict[str, tuple[float, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite"] = run(f"sqlite:///{Path(tmp) / 'bench.db'}", args.items, args.chunk_size)
    admin = os.environ.get("LOOM_BENCH_PG_URL", DEFAULT_PG_ADMIN)
    scratch = pg_scratch(admin)
    if scratch is not None:
        name, url = scratch
        try:
            results["postgresql"] = run(url, args.items, args.chunk_size)
        finally:
            pg_drop(admin, name)

    print(f"submit of one {args.items:,}-item job (chunk size {args.chunk_size}; job + items + "
          f"outbox in one transaction)")
    print(f"{'database':<12}{'seconds':>10}{'rows/s':>14}")
    for db, (seconds, n) in results.items():
        print(f"{db:<12}{seconds:>10.2f}{n / seconds:>14,.0f}")
    if len(results) == 2:
        ratio = results["postgresql"][0] / results["sqlite"][0]
        print(f"postgresql / sqlite time ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
