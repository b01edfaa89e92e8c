"""Control-plane throughput: claim -> complete with a model that returns at once, on PostgreSQL
(or, with --db sqlite, on an embedded run's SQLite file).

    .venv/bin/python bench/control_plane.py [--items 40000] [--procs 1,4,8] [--batch 32,128,512]
        [--claim-batches N] [--db postgresql|sqlite] [--baseline GITREF [--rounds R]]

With --baseline, the same measurement (this script, one configuration: the first of --procs and
--batch) runs R times alternately on this tree and on GITREF (a git worktree of it, which this
script imports loom from), and prints each round's CPU per item side by side, the ratio of each
round to the baseline rounds beside it, and the median ratio: this host's CPU speed drifts
between runs minutes apart, so only ratios measured side by side mean anything.

For every (processes, batch) configuration it creates a scratch database on PostgreSQL
(LOOM_BENCH_PG_URL, default postgresql+psycopg://root@127.0.0.1:5432/postgres is used only to
CREATE/DROP it), submits one job of --items items (not timed), then P worker processes each take
chunks (chunk = Settings.chunk_batches batches) from a shared queue, as Celery would hand them
out, and, as the engine does, claim --claim-batches batches at a time (default
Settings.claim_batches) and complete them batch by batch until the job is finalised. Timed: from the
moment all processes are ready until the last one is done. Prints items/s per configuration
and the CPU each item cost: the worker processes' (client) and every postgres process's (database,
read from /proc, so the server must run on this host).

No torch: the "model" returns a constant caption, so what is measured is only the database work a
worker does per item (claim, fenced completion, output + lineage rows, events, finalisation check).
The results carry what a worker's do: a result-cache key (jobs use the cache by default) and,
with the last batch of a claim, the lease rows it ends (where the tree has them).
"""

from __future__ import annotations

import argparse
import inspect
import json
import multiprocessing as mp
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from submit_throughput import DEFAULT_PG_ADMIN, pg_drop, pg_scratch  # noqa: E402


def _worker(url: str, chunks: mp.Queue, ready: mp.Barrier, batch: int, claim_batches: int,
            out: mp.Queue, finish: mp.Event) -> None:
    from loom import jobs
    from loom.db import WORKER_PING_IDLE_SECONDS, make_engine, make_session_factory

    # As a worker process's engine (worker.tasks): pinged only after sitting idle.
    engine = make_engine(url, pool_size=1, ping_idle_seconds=WORKER_PING_IDLE_SECONDS)
    session_factory = make_session_factory(engine)
    worker_id = f"bench:{os.getpid()}"
    # A baseline tree from before lease rows (migration 0015) has no end_leases.
    ends_leases = "end_leases" in inspect.signature(jobs.complete_items).parameters
    done = 0
    with session_factory() as session:
        # Warm the connection and SQLAlchemy's statement cache outside the timed window.
        jobs.claim_items(session, job_id="none", start=0, end=0, worker_id=worker_id,
                         limit=batch, lease_seconds=60)
        ready.wait()
        cpu0 = time.process_time()
        while True:
            chunk = chunks.get()
            if chunk is None:
                break
            job_id, start, end = chunk
            while True:
                # As the engine: claim_batches batches per claim, each completed on its own.
                claimed = jobs.claim_items(session, job_id=job_id, start=start, end=end,
                                           worker_id=worker_id, limit=batch * claim_batches,
                                           lease_seconds=60)
                if not claimed:
                    break
                for b0 in range(0, len(claimed), batch):
                    # As the finisher: a job whose later batches this worker still holds has
                    # open items, so the completion does not look (open_jobs); the last batch
                    # of the claim ends its lease row.
                    last = b0 + batch >= len(claimed)
                    busy = set() if last else {job_id}
                    results = [
                        jobs.ItemResult(item_id=c.id, kind="text", text="a red circle",
                                        input_sha256=f"{c.index:064x}", model_version="1",
                                        weights_sha256="f" * 64, seed=c.index,
                                        timings={"fetch_ms": 0.1, "decode_ms": 0.2,
                                                 "infer_ms": 0.0, "infer_batch_size": 32.0},
                                        cache_key=f"{c.index:063x}c", attempt=c.attempts)
                        for c in claimed[b0:b0 + batch]
                    ]
                    extra = {}
                    if ends_leases and last:
                        extra["end_leases"] = {c.lease_id for c in claimed}
                    done += jobs.complete_items(session, worker_id=worker_id, results=results,
                                                open_jobs=busy, **extra)
        cpu = time.process_time() - cpu0
        # The connection stays open until the parent has read the database's CPU time: a
        # backend's CPU leaves /proc with it.
        out.put((done, cpu))
        finish.wait()
    engine.dispose()


def _report(out: mp.Queue, workers: list[mp.process.BaseProcess]) -> tuple[int, float]:
    """The next worker's (items done, CPU seconds); fails when a worker died instead."""
    while True:
        try:
            return out.get(timeout=1.0)
        except queue.Empty:
            dead = [w for w in workers if w.exitcode not in (None, 0)]
            if dead:
                raise SystemExit(f"a worker process failed (exit code {dead[0].exitcode})")


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


class Result(NamedTuple):
    items_per_s: float
    client_us: float  # worker processes' CPU per item
    db_us: float | None  # PostgreSQL's CPU per item (every postgres process); None on SQLite


def postgres_cpu_seconds() -> float:
    """CPU time (user + system) of every live postgres process on this host, from /proc: the
    backends serving the workers plus the WAL writer, checkpointer and the rest, which do part
    of the work a commit causes."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # exited meanwhile
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        if comm.startswith("postgres"):
            fields = stat[stat.rindex(")") + 2:].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def run_config(db: str, admin: str, n_items: int, procs: int, batch: int,
               claim_batches: int) -> Result:
    from sqlalchemy import select

    from loom import jobs, tenants
    from loom.config import Settings
    from loom.db import make_engine, make_session_factory, upgrade
    from loom.models import Job

    with scratch_database(db, admin) as url:
        upgrade(url)
        engine = make_engine(url)
        session_factory = make_session_factory(engine)
        chunk_size = batch * Settings.model_fields["chunk_batches"].default
        with session_factory() as session:
            tenant = tenants.ensure_tenant(session, name="bench")
            job = jobs.submit_job(
                session, tenant_id=tenant.id, task="caption", model_name="loom-shapes",
                items=[{"input": {"image_key": f"t/jobs/x/inputs/{i}.png"}}
                       for i in range(n_items)],
                chunk_size=chunk_size, max_attempts=3)
        if db == "postgresql":
            with engine.connect() as conn:  # what a worker's first claims would otherwise do
                conn.exec_driver_sql("CHECKPOINT")
        ctx = mp.get_context("spawn")
        chunks: mp.Queue = ctx.Queue()
        for start in range(0, n_items, chunk_size):
            chunks.put((job.id, start, min(start + chunk_size, n_items)))
        for _ in range(procs):
            chunks.put(None)
        ready = ctx.Barrier(procs + 1)
        finish = ctx.Event()
        out: mp.Queue = ctx.Queue()
        workers = [ctx.Process(target=_worker, args=(url, chunks, ready, batch, claim_batches, out, finish))
                   for _ in range(procs)]
        for w in workers:
            w.start()
        ready.wait(timeout=300)  # BrokenBarrierError when a worker failed to start
        db_cpu0 = postgres_cpu_seconds()
        t0 = time.perf_counter()
        reports = [_report(out, workers) for _ in workers]
        elapsed = time.perf_counter() - t0
        db_cpu = postgres_cpu_seconds() - db_cpu0
        finish.set()
        for w in workers:
            w.join()
        with session_factory() as session:
            status = session.scalar(select(Job.status).where(Job.id == job.id))
        engine.dispose()
        done = sum(d for d, _ in reports)
        assert done == n_items, (done, n_items)
        assert status == "succeeded", status
        client = sum(c for _, c in reports)
        return Result(n_items / elapsed, client / n_items * 1e6,
                      db_cpu / n_items * 1e6 if db == "postgresql" else None)


def _one_run(tree: Path, args: argparse.Namespace) -> dict[str, float]:
    """This script, on ``tree``'s loom, in a fresh interpreter: one configuration's result."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--items", str(args.items),
           "--procs", args.procs.split(",")[0], "--batch", args.batch.split(",")[0],
           "--db", args.db, "--json"]
    if args.claim_batches:
        cmd += ["--claim-batches", str(args.claim_batches)]
    out = subprocess.run(cmd, cwd=tree, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def side_by_side(args: argparse.Namespace) -> None:
    """--baseline: alternate this tree and a worktree of the baseline ref, R rounds, and a last
    baseline run, each of this tree's runs judged against the baseline runs either side of it."""
    here = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(here), "worktree", "add", "--detach", str(base),
                        args.baseline], check=True, capture_output=True)
        try:
            base_runs = [_one_run(base, args)]
            runs: list[dict[str, float]] = []
            for r in range(args.rounds):
                runs.append(_one_run(here, args))
                base_runs.append(_one_run(base, args))
                b0, b1, h = base_runs[r], base_runs[r + 1], runs[r]
                print(f"  round {r + 1}: baseline {b0['total_us']:.0f} / {b1['total_us']:.0f}, "
                      f"this tree {h['total_us']:.0f} us per item", file=sys.stderr)
        finally:
            subprocess.run(["git", "-C", str(here), "worktree", "remove", "--force", str(base)],
                           check=False, capture_output=True)
    ratios = {k: [h[k] / ((b0[k] + b1[k]) / 2) for h, b0, b1 in
                  zip(runs, base_runs, base_runs[1:])]
              for k in ("total_us", "client_us", "db_us", "items_per_s")}
    print(f"claim -> complete, {args.items:,} items, {args.db}, processes "
          f"{args.procs.split(',')[0]}, batch {args.batch.split(',')[0]}: this tree vs "
          f"{args.baseline}, {args.rounds} rounds alternated ({os.cpu_count()} CPUs)")
    print(f"{'round':<8}{'baseline us/item':>24}{'this tree us/item':>24}{'ratio':>8}")
    for r, (h, b0, b1) in enumerate(zip(runs, base_runs, base_runs[1:]), 1):
        def cell(x: dict[str, float]) -> str:
            return f"{x['client_us']:.0f} + {x['db_us']:.0f} = {x['total_us']:.0f}"
        base_mean = {k: (b0[k] + b1[k]) / 2 for k in ("client_us", "db_us", "total_us")}
        print(f"{r:<8}{cell(base_mean):>24}{cell(h):>24}{ratios['total_us'][r - 1]:>8.2f}")
    print("median ratio, this tree / baseline: CPU per item "
          f"{statistics.median(ratios['total_us']):.2f} (client "
          f"{statistics.median(ratios['client_us']):.2f}, database "
          f"{statistics.median(ratios['db_us']):.2f}); items/s "
          f"{statistics.median(ratios['items_per_s']):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=40_000)
    parser.add_argument("--procs", default="1,4,8", help="comma-separated process counts")
    parser.add_argument("--batch", default="32", help="comma-separated batch sizes")
    parser.add_argument("--claim-batches", type=int, default=None,
                        help="batches per claim statement (default: Settings.claim_batches)")
    parser.add_argument("--db", choices=("postgresql", "sqlite"), default="postgresql",
                        help="sqlite: an embedded run's database (a file in a temp folder)")
    parser.add_argument("--baseline", default=None,
                        help="a git ref to measure side by side with this tree")
    parser.add_argument("--rounds", type=int, default=3, help="with --baseline")
    parser.add_argument("--json", action="store_true",
                        help="print one configuration's result as a JSON line (for --baseline)")
    args = parser.parse_args()
    if args.baseline:
        side_by_side(args)
        return
    procs = [int(p) for p in args.procs.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    admin = os.environ.get("LOOM_BENCH_PG_URL", DEFAULT_PG_ADMIN)
    from loom.config import Settings

    claim_batches = args.claim_batches or Settings.model_fields["claim_batches"].default

    table: dict[tuple[int, int], Result] = {}
    for b in batches:
        for p in procs:
            r = run_config(args.db, admin, args.items, p, b, claim_batches)
            table[(p, b)] = r
            db_us = f"{r.db_us:.0f}" if r.db_us is not None else "-"
            print(f"  processes={p} batch={b}: {r.items_per_s:,.0f} items/s, CPU per item "
                  f"{r.client_us:.0f} us client + {db_us} us database", file=sys.stderr)
            if args.json:
                print(json.dumps({"items_per_s": r.items_per_s, "client_us": r.client_us,
                                  "db_us": r.db_us or 0.0,
                                  "total_us": r.client_us + (r.db_us or 0.0)}))
                return

    print(f"claim -> complete, {args.items:,} items, {args.db}, instant model, "
          f"{claim_batches} batch(es) per claim ({os.cpu_count()} CPUs)")
    print("items/s")
    print(f"{'processes':<12}" + "".join(f"{'batch ' + str(b):>14}" for b in batches))
    for p in procs:
        print(f"{p:<12}" + "".join(f"{table[(p, b)].items_per_s:>14,.0f}" for b in batches))
    print("CPU microseconds per item: client + database = total")
    print(f"{'processes':<12}" + "".join(f"{'batch ' + str(b):>22}" for b in batches))
    for p in procs:
        cells = []
        for b in batches:
            r = table[(p, b)]
            if r.db_us is None:
                cells.append(f"{r.client_us:.0f} (in process)")
            else:
                cells.append(f"{r.client_us:.0f} + {r.db_us:.0f} = {r.client_us + r.db_us:.0f}")
        print(f"{p:<12}" + "".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
