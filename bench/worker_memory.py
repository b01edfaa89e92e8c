"""Does a worker's memory stay flat? One `loom worker` (the README's command) on PostgreSQL +
Redis + a local store runs one caption job of N items (default 100,000; 2,000 rendered scenes
used round robin, the result cache off so every item is inferred), and the resident memory of
the worker's whole process tree is read every second. Printed: the RSS after the first 10% of
the items and at the end, and their ratio (the issue's target: within 10%).

    .venv/bin/python bench/worker_memory.py [--items 100000] [--scenes 2000]

PostgreSQL (--pg, an admin URL; a fresh database is created and dropped) and Redis (--redis, a
DB of its own; nothing is flushed), as bench/eta.py.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402 - the shared bench helpers (scenes, services, the loom command)


def tree_rss_mb(pid: int) -> float:
    """The summed RSS of ``pid``'s session (the worker and the model processes it forks)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) != pid:
                continue
            with (entry / "statm").open() as f:
                total += int(f.read().split()[1])
        except (OSError, ProcessLookupError):
            continue
    return total * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--scenes", type=int, default=2000)
    ap.add_argument("--pg", default=os.environ.get(
        "LOOM_BENCH_PG", "postgresql://127.0.0.1:5432/postgres"))
    ap.add_argument("--redis", default=os.environ.get(
        "LOOM_BENCH_REDIS", "redis://127.0.0.1:6379/13"))
    args = ap.parse_args()

    from loom import jobs
    from loom.config import Settings
    from loom.db import make_engine, make_session_factory
    from loom.storage import input_key, store_from_settings
    from loom.tenants import ensure_tenant
    from worker.app import make_celery, make_publisher

    work = Path(tempfile.mkdtemp(prefix="loom-mem-"))
    paths, _ = harness.render_inputs(work, args.scenes)
    svc = harness.Services(args.pg, args.redis)
    loom_env = dict(home=work / "home", database_url=svc.database_url, broker_url=svc.redis_url,
                    storage_url=f"file://{work / 'store'}", auth="off", device="cpu")
    settings = Settings(**loom_env)
    store = store_from_settings(settings)
    db = make_engine(svc.database_url)
    sf = make_session_factory(db)
    celery_app = make_celery(settings)
    with sf() as s:
        tenant = ensure_tenant(s, name="local").id
    upload = secrets.token_hex(6)
    keys = []
    for i, p in enumerate(paths):
        keys.append(input_key(tenant, upload, i, p.suffix.lstrip(".")))
        store.put(keys[-1], p.read_bytes())
    log_path = work / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen([*harness.loom_cmd(), "worker", "-l", "warning"],
                                  env=harness.env_for(**loom_env), stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    samples: list[tuple[int, float]] = []
    try:
        t0 = time.perf_counter()
        with sf() as s:
            job = jobs.submit_job(
                s, tenant_id=tenant, task="caption", model_name=settings.default_model,
                items=({"input": {"image_key": keys[i % len(keys)]}} for i in range(args.items)),
                chunk_size=settings.chunk_size, max_attempts=settings.max_attempts,
                use_cache=False)
            jobs.publish_pending(s, publish=make_publisher(celery_app), job_id=job.id,
                                 limit=args.items)
        while True:
            with sf() as s:
                progress = jobs.job_progress(s, job_id=job.id)
            samples.append((progress.done, tree_rss_mb(worker.pid)))
            if progress.status in ("succeeded", "completed_with_errors", "failed", "cancelled"):
                break
            if worker.poll() is not None:
                raise RuntimeError(f"loom worker exited; see {log_path}")
            time.sleep(1.0)
        seconds = time.perf_counter() - t0
    finally:
        try:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        celery_app.close()
        db.dispose()
        svc.close()
    tenth = next(rss for n, rss in samples if n >= args.items // 10)
    end = max(rss for n, rss in samples if n >= args.items * 9 // 10)
    peak = max(rss for _, rss in samples)
    print(f"{args.items:,} caption items in {seconds:.1f} s ({args.items / seconds:.0f} items/s); "
          f"worker tree RSS after 10%: {tenth:.0f} MB, over the last 10%: {end:.0f} MB "
          f"(x{end / tenth:.3f}), peak {peak:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
