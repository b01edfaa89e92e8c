"""Small jobs on a running `loom worker`: one-item latency, and many small jobs against one big one.

    .venv/bin/python bench/small_jobs.py [--jobs 1000 --size 5] [--latency 30]

One `loom worker` (the README's command for the host) on PostgreSQL + Redis with a local file
store, caption, the shipped checkpoint. After a warm-up job it measures, in one run:

  latency   --latency one-item jobs, one after another: submit (job + items + outbox, publish) ->
            the job's final status, polled every 2 ms. Printed beside the model's own time for one
            image in this process (median of as many calls), and the difference (Loom's overhead).
  fan-in    --jobs jobs of --size items submitted together (one submitting thread, as a producer
            would), until every one is final; against one job of jobs x size items on the same
            worker. The ratio of the two rates is what issue 12's "1,000 jobs of 5 items" asks.
            Measured twice: submitted one by one while the worker runs (the producer's own cost,
            about 10 ms a job on this machine, shares the cores), and recorded beforehand, then
            published in one pass (the worker side alone).

Needs PostgreSQL (--pg, an admin URL: a scratch database is created and dropped) and Redis (--redis,
a DB of its own; nothing is flushed). Numbers are ratios from one run on this machine.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402  (bench/harness.py: inputs, services, the worker command)

# Seconds between looks at the bulk phases' jobs (the same for the small jobs and the one big job;
# at most this much is added to either time).
BULK_POLL = 0.1

TERMINAL = ("succeeded", "completed_with_errors", "failed", "cancelled")


def model_ms(path: Path, n: int) -> float:
    """The model's own time for one image (decode included), median of ``n`` calls."""
    import torch

    from loom import media
    from pipeline import registry

    torch.set_num_threads(1)  # as each of the worker's model processes runs
    model = registry.load("loom-shapes", device="cpu")
    times = []
    for _ in range(n + 3):
        t0 = time.perf_counter()
        model.caption([media.decode_image(path.read_bytes(), max_pixels=harness.MAX_PIXELS)])
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times[3:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--size", type=int, default=5)
    ap.add_argument("--latency", type=int, default=30, help="one-item jobs timed one by one")
    ap.add_argument("--pg", default=os.environ.get("LOOM_BENCH_PG",
                                                    "postgresql://127.0.0.1:5432/postgres"))
    ap.add_argument("--redis", default=os.environ.get("LOOM_BENCH_REDIS",
                                                       "redis://127.0.0.1:6379/13"))
    a = ap.parse_args(argv)

    from sqlalchemy import select

    from loom import jobs
    from loom.models import Job
    from loom.storage import input_key

    n = a.jobs * a.size
    work = Path(tempfile.mkdtemp(prefix="loom-small-"))
    paths, _ = harness.render_inputs(work, n)
    svc = harness.Services(a.pg, a.redis)
    # The worker's reconciler publishes every unpublished outbox row it finds: it could start the
    # held jobs (below) while they are still being recorded, before the clock starts. Nothing
    # here needs it: no worker is killed.
    loom_env: dict[str, Any] = dict(home=work / "home", database_url=svc.database_url,
                                    broker_url=svc.redis_url, auth="off", device="cpu",
                                    storage_url=f"file://{work / 'store'}",
                                    reconcile_interval_seconds=3600)
    settings, store, db, sf, celery_app, publish, tenant = harness.producer(loom_env)
    items = []
    for i, p in enumerate(paths):
        key = input_key(tenant, "small", i, p.suffix.lstrip("."))
        store.put(key, p.read_bytes())
        items.append({"input": {"image_key": key}})

    def submit(some: list[dict[str, Any]], *, now: bool = True) -> str:
        with sf() as s:
            job = jobs.submit_job(s, tenant_id=tenant, task="caption",
                                  model_name=settings.default_model, items=some,
                                  chunk_size=settings.chunk_size, max_attempts=3,
                                  use_cache=False)  # every item runs the model
            if now:
                jobs.publish_pending(s, publish=publish, job_id=job.id)
            return job.id

    def release() -> None:
        """Publish every job submitted with now=False, in one pass (as the reconciler would)."""
        with sf() as s:
            while jobs.publish_pending(s, publish=publish, limit=1000):
                pass

    def unfinished(ids: list[str]) -> list[str]:
        with sf() as s:
            return list(s.scalars(select(Job.id).where(Job.id.in_(ids),
                                                       Job.status.not_in(TERMINAL))))

    def wait(ids: list[str], poll: float) -> None:
        # Only the jobs still open are asked about again: polling all 1,000 every time cost
        # this process (and PostgreSQL) about 5 s of CPU per run, taken from the worker.
        while ids := unfinished(ids):
            if worker.poll() is not None:
                raise RuntimeError(f"loom worker exited ({worker.returncode})")
            time.sleep(poll)

    log_path = work / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [*harness.loom_cmd(), "worker", "-n", f"small-{secrets.token_hex(3)}@%h", "-l",
             "warning"], env=harness.env_for(**loom_env), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        wait([submit(items[:64])], 0.05)  # warm-up: processes up, model loaded
        wait([submit(items[:1]) for _ in range(4)], 0.01)

        lat = []
        for i in range(a.latency):
            t0 = time.perf_counter()
            job_id = submit(items[i:i + 1])
            wait([job_id], 0.002)
            lat.append((time.perf_counter() - t0) * 1000.0)
        m_ms = model_ms(paths[0], a.latency)

        t0 = time.perf_counter()
        ids = [submit(items[k * a.size:(k + 1) * a.size]) for k in range(a.jobs)]
        submitted = time.perf_counter() - t0
        wait(ids, BULK_POLL)
        fan_s = time.perf_counter() - t0

        # The same, with the producer out of the clock: every job recorded first (unpublished,
        # so no worker sees it), then all released at once. The last tasks of the phase above
        # linger, filling their batches from any queued job (chunk_linger_seconds): recorded
        # meanwhile, the held jobs would be run before the clock starts. Let them end first.
        time.sleep(settings.chunk_linger_seconds + 1.0)
        t_rec = time.perf_counter()
        held = [submit(items[k * a.size:(k + 1) * a.size], now=False) for k in range(a.jobs)]
        recorded_s = time.perf_counter() - t_rec
        t0 = time.perf_counter()
        release()
        wait(held, BULK_POLL)
        held_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        wait([submit(items)], BULK_POLL)
        big_s = time.perf_counter() - t0
    finally:
        harness.stop_worker(worker)
        celery_app.close()
        db.dispose()
        svc.close()
        shutil.rmtree(work, ignore_errors=True)

    lat.sort()
    p50, p90 = statistics.median(lat), lat[int(0.9 * (len(lat) - 1))]
    print(f"one-item job, submit -> succeeded ({a.latency} jobs): median {p50:.1f} ms, "
          f"p90 {p90:.1f} ms, min {lat[0]:.1f} ms; the model alone: {m_ms:.1f} ms; "
          f"overhead (median - model): {p50 - m_ms:.1f} ms")
    print(f"{a.jobs} jobs x {a.size} items: {fan_s:.2f} s ({n / fan_s:.1f} items/s; submitting "
          f"took {submitted:.2f} s of it)")
    print(f"{a.jobs} jobs x {a.size} items, recorded beforehand and released at once: "
          f"{held_s:.2f} s ({n / held_s:.1f} items/s; recording them, with the worker idle, "
          f"took {recorded_s:.2f} s: {recorded_s / a.jobs * 1000:.1f} ms a job)")
    print(f"1 job x {n} items: {big_s:.2f} s ({n / big_s:.1f} items/s)")
    print(f"ratio (many small / one big), submitted one by one: {big_s / fan_s:.2f}; "
          f"released at once (producer out of the clock): {big_s / held_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
