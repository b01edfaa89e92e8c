"""Control-plane throughput: claim -> complete with a model that returns at once, on PostgreSQL
(or, with --db sqlite, on an embedded run's SQLite file).

    .venv/bin/python bench/control_plane.py [--items 40000] [--procs 1,4,8] [--batch 32,128,512]
        [--db postgresql|sqlite]

For every (processes, batch) configuration it creates a scratch database on PostgreSQL
(LOOM_BENCH_PG_URL, default postgresql+psycopg://root@127.0.0.1:5432/postgres is used only to
CREATE/DROP it), submits one job of --items items (not timed), then P worker processes each take
chunks (chunk = 4 batches, like Settings.chunk_size) from a shared queue, as Celery would hand them
out, and run claim_items -> complete_items per batch until the job is finalised. Timed: from the
moment all processes are ready until the last one is done. Prints items/s per configuration.

No torch: the "model" returns a constant caption, so what is measured is only the database work a
worker does per item (claim, fenced completion, output + lineage rows, events, finalisation check).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from submit_throughput import DEFAULT_PG_ADMIN, pg_drop, pg_scratch  # noqa: E402


def _worker(url: str, chunks: mp.Queue, ready: mp.Barrier, batch: int, out: mp.Queue) -> None:
    from loom import jobs
    from loom.db import WORKER_PING_IDLE_SECONDS, make_engine, make_session_factory

    # As a worker process's engine (worker.tasks): pinged only after sitting idle.
    engine = make_engine(url, pool_size=1, ping_idle_seconds=WORKER_PING_IDLE_SECONDS)
    session_factory = make_session_factory(engine)
    worker_id = f"bench:{os.getpid()}"
    done = 0
    with session_factory() as session:
        # Warm the connection and SQLAlchemy's statement cache outside the timed window.
        jobs.claim_items(session, job_id="none", start=0, end=0, worker_id=worker_id,
                         limit=batch, lease_seconds=60)
        ready.wait()
        while True:
            chunk = chunks.get()
            if chunk is None:
                break
            job_id, start, end = chunk
            while True:
                claimed = jobs.claim_items(session, job_id=job_id, start=start, end=end,
                                           worker_id=worker_id, limit=batch, lease_seconds=60)
                if not claimed:
                    break
                results = [
                    jobs.ItemResult(item_id=c.id, kind="text", text="a red circle",
                                    input_sha256="0" * 64, model_version="1",
                                    weights_sha256="f" * 64, seed=c.index,
                                    timings={"infer_ms": 0.0}, attempt=c.attempts)
                    for c in claimed
                ]
                done += jobs.complete_items(session, worker_id=worker_id, results=results)
    engine.dispose()
    out.put(done)


@contextmanager
def scratch_database(db: str, admin: str) -> Iterator[str]:
    """A database URL of its own for one configuration, removed afterwards."""
    if db == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            yield f"sqlite:///{Path(tmp) / 'bench.db'}"
        return
    scratch = pg_scratch(admin)
    if scratch is None:
        raise SystemExit("postgresql unavailable")
    name, url = scratch
    try:
        yield url
    finally:
        pg_drop(admin, name)


def run_config(db: str, admin: str, n_items: int, procs: int, batch: int) -> float:
    from sqlalchemy import select

    from loom import jobs, tenants
    from loom.db import make_engine, make_session_factory, upgrade
    from loom.models import Job

    with scratch_database(db, admin) as url:
        upgrade(url)
        engine = make_engine(url)
        session_factory = make_session_factory(engine)
        chunk_size = batch * 4
        with session_factory() as session:
            tenant = tenants.ensure_tenant(session, name="bench")
            job = jobs.submit_job(
                session, tenant_id=tenant.id, task="caption", model_name="loom-shapes",
                items=[{"input": {"image_key": f"t/jobs/x/inputs/{i}.png"}}
                       for i in range(n_items)],
                chunk_size=chunk_size, max_attempts=3)
        ctx = mp.get_context("spawn")
        chunks: mp.Queue = ctx.Queue()
        for start in range(0, n_items, chunk_size):
            chunks.put((job.id, start, min(start + chunk_size, n_items)))
        for _ in range(procs):
            chunks.put(None)
        ready = ctx.Barrier(procs + 1)
        out: mp.Queue = ctx.Queue()
        workers = [ctx.Process(target=_worker, args=(url, chunks, ready, batch, out))
                   for _ in range(procs)]
        for w in workers:
            w.start()
        ready.wait()
        t0 = time.perf_counter()
        done = sum(out.get() for _ in workers)
        elapsed = time.perf_counter() - t0
        for w in workers:
            w.join()
        with session_factory() as session:
            status = session.scalar(select(Job.status).where(Job.id == job.id))
        engine.dispose()
        assert done == n_items, (done, n_items)
        assert status == "succeeded", status
        return n_items / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=40_000)
    parser.add_argument("--procs", default="1,4,8", help="comma-separated process counts")
    parser.add_argument("--batch", default="32", help="comma-separated batch sizes")
    parser.add_argument("--db", choices=("postgresql", "sqlite"), default="postgresql",
                        help="sqlite: an embedded run's database (a file in a temp folder)")
    args = parser.parse_args()
    procs = [int(p) for p in args.procs.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    admin = os.environ.get("LOOM_BENCH_PG_URL", DEFAULT_PG_ADMIN)

    table: dict[tuple[int, int], float] = {}
    for b in batches:
        for p in procs:
            table[(p, b)] = run_config(args.db, admin, args.items, p, b)
            print(f"  processes={p} batch={b}: {table[(p, b)]:,.0f} items/s", file=sys.stderr)

    print(f"claim -> complete, {args.items:,} items, {args.db}, instant model "
          f"({os.cpu_count()} CPUs); items/s")
    print(f"{'processes':<12}" + "".join(f"{'batch ' + str(b):>14}" for b in batches))
    for p in procs:
        print(f"{p:<12}" + "".join(f"{table[(p, b)]:>14,.0f}" for b in batches))


if __name__ == "__main__":
    main()
