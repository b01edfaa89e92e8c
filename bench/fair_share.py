"""Fair share between tenants on one fleet, measured in one run (PostgreSQL + Redis + one
``loom worker`` with a local store, the shapes model captioning).

Prints:
1. one-item jobs on an idle fleet: submit-to-done latency (the reference);
2. tenant A's large job alone, with fair share on and off: A's throughput (their ratio is what
   the fair-share step costs the claim path);
3. A's large job while tenant B submits one-item jobs one second apart: B's median latency
   against the idle one (target <= 2x) and A's throughput against A alone (target >= 0.9);
4. A and B each running a large job, weights 1:1 then 2:1: A's share of the claimed items in each
   10-second window (from the tenant_claims rows), against the weights (target within 10%);
5. limits: with a per-minute limit of L, how many of L + 3 quick submissions are accepted.

    python bench/fair_share.py --n 50000          # the issue's sizes (about 10 minutes here)
    python bench/fair_share.py --n 8000 --b-jobs 10   # a quicker look
"""
from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Services, env_for, loom_cmd, producer, render_inputs, stop_worker  # noqa: E402

FINAL = ("succeeded", "completed_with_errors", "failed", "cancelled")


class Fleet:
    """One ``loom worker`` and what a producer needs to submit to it."""

    def __init__(self, svc: Services, work: Path, *, fair_share: bool, batch: int) -> None:
        self.env: dict[str, Any] = dict(
            home=work / "home", database_url=svc.database_url, broker_url=svc.redis_url,
            storage_url=f"file://{work / 'store'}", auth="off", device="cpu", batch_size=batch,
            fair_share=str(fair_share).lower())
        (self.settings, self.store, self.db, self.sf, self.celery, self.publish,
         self.local) = producer(self.env)
        self.log = work / f"worker-{secrets.token_hex(3)}.log"
        with self.log.open("wb") as log:
            self.worker = subprocess.Popen(
                [*loom_cmd(), "worker", "-n", f"fair-{secrets.token_hex(3)}@%h", "-l", "warning"],
                env=env_for(**self.env), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)

    def tenant(self, name: str) -> str:
        from loom.tenants import ensure_tenant

        with self.sf() as s:
            return ensure_tenant(s, name=name).id

    def submit(self, tenant: str, keys: list[str], n: int) -> tuple[str, float]:
        from loom import jobs

        items = [{"input": {"image_key": keys[i % len(keys)]}} for i in range(n)]
        t0 = time.monotonic()
        with self.sf() as s:
            job = jobs.submit_job(
                s, tenant_id=tenant, task="caption", model_name="loom-shapes", items=items,
                chunk_size=self.settings.chunk_size, max_attempts=3, use_cache=False,
                fast_lane_items=self.settings.fast_lane_max_items)
            jobs.publish_pending(s, publish=self.publish, job_id=job.id)
        return job.id, t0

    def wait(self, job_id: str, poll: float = 0.05) -> float:
        from loom import jobs

        while True:
            with self.sf() as s:
                if jobs.job_status(s, job_id=job_id) in FINAL:
                    return time.monotonic()
            if self.worker.poll() is not None:
                raise RuntimeError(f"loom worker exited; see {self.log}")
            time.sleep(poll)

    def rate(self, job_id: str) -> float:
        """Items per second from the job's first claim to its end (from its rows)."""
        from sqlalchemy import func, select

        from loom.models import Item, Job

        with self.sf() as s:
            first, n, end = s.execute(
                select(func.min(Item.started_at), func.count(), Job.finished_at)
                .join(Job, Job.id == Item.job_id).where(Item.job_id == job_id)
                .group_by(Job.finished_at)).one()
        return n / max((end - first).total_seconds(), 1e-9)

    def close(self) -> None:
        stop_worker(self.worker)
        self.celery.close()
        self.db.dispose()


def latency_parts(fleet: Fleet, seen: dict[str, datetime]) -> dict[str, float]:
    """Medians (seconds) of where B's one-item jobs spent their time, from their rows: waiting
    to be claimed (job created -> item claimed), running (claimed -> output written),
    finishing (output -> job finished) and being seen (job finished -> the producer's poll,
    every 50 ms); and the whole of it in the database (created -> finished), which leaves out
    how the producer learns of it."""
    from sqlalchemy import select

    from loom.models import Item, Job, Output

    parts: dict[str, list[float]] = {"wait for a claim": [], "run": [], "finish": [],
                                     "seen by the producer": [], "created -> finished": []}
    with fleet.sf() as s:
        rows = s.execute(
            select(Job.id, Job.created_at, Item.started_at, Output.created_at, Job.finished_at)
            .join(Item, Item.job_id == Job.id).join(Output, Output.item_id == Item.id)
            .where(Job.id.in_(list(seen)))).all()
    for job_id, created, claimed, output, finished in rows:
        parts["wait for a claim"].append((claimed - created).total_seconds())
        parts["run"].append((output - claimed).total_seconds())
        parts["finish"].append((finished - output).total_seconds())
        parts["seen by the producer"].append((seen[job_id] - finished).total_seconds())
        parts["created -> finished"].append((finished - created).total_seconds())
    return {k: statistics.median(v) for k, v in parts.items() if v}


def upload(fleet: Fleet, tenant: str, paths: list[Path]) -> list[str]:
    from loom.storage import input_key

    upload_id = secrets.token_hex(6)
    keys = []
    for i, p in enumerate(paths):
        key = input_key(tenant, upload_id, i, p.suffix.lstrip("."))
        fleet.store.put(key, p.read_bytes())
        keys.append(key)
    return keys


def shares_by_window(fleet: Fleet, a: str, b: str, since: Any, until: Any,
                     window: float = 10.0) -> list[float]:
    """A's share of the items claimed by A and B in each full window between the two times."""
    from sqlalchemy import select

    from loom.models import TenantClaim

    with fleet.sf() as s:
        rows = s.execute(select(TenantClaim.tenant_id, TenantClaim.claimed_at, TenantClaim.n)
                         .where(TenantClaim.claimed_at >= since,
                                TenantClaim.claimed_at < until)).all()
    if not rows:
        return []
    start = min(r.claimed_at for r in rows)
    windows: dict[int, list[int]] = {}
    for r in rows:
        k = int((r.claimed_at - start).total_seconds() // window)
        w = windows.setdefault(k, [0, 0])
        w[0 if r.tenant_id == a else 1] += r.n
    full = sorted(windows)[:-1]  # the last window is cut short
    return [windows[k][0] / max(1, sum(windows[k])) for k in full]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50_000, help="items of A's large job")
    ap.add_argument("--b-jobs", type=int, default=20, help="B's one-item jobs, 1 s apart")
    ap.add_argument("--pair", type=int, default=None,
                    help="items of each large job in the weights runs (default n/2)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--parts", default="alone,latency,weights,limits",
                    help="comma-separated: alone (A with fair share off/on), latency (B beside "
                         "A), weights (1:1 and 2:1), limits (429 at the limit)")
    ap.add_argument("--pg", default=os.environ.get("LOOM_BENCH_PG",
                                                    "postgresql://127.0.0.1:5432/postgres"))
    ap.add_argument("--redis", default=os.environ.get("LOOM_BENCH_REDIS",
                                                       "redis://127.0.0.1:6379/13"))
    a = ap.parse_args(argv)
    pair = a.pair or a.n // 2
    work = Path(tempfile.mkdtemp(prefix="loom-fair-"))
    paths, _ = render_inputs(work, 64)
    from loom import jobs
    from loom.errors import LimitExceeded
    from loom.models import utcnow

    svc = Services(a.pg, a.redis)
    try:
        print(f"fair share: 1 loom worker, PostgreSQL + Redis + local store, caption, batch "
              f"{a.batch}; A's job {a.n} items, weights runs {pair} items each")
        parts = set(a.parts.split(","))
        rates: dict[str, float] = {}
        for mode in ("off", "on") if "alone" in parts else ():
            fleet = Fleet(svc, work / f"alone-{mode}", fair_share=mode == "on", batch=a.batch)
            try:
                ta = fleet.tenant("a")
                keys = upload(fleet, ta, paths)
                fleet.wait(fleet.submit(ta, keys, a.batch * 2)[0])  # warm-up
                job, _ = fleet.submit(ta, keys, a.n)
                fleet.wait(job, poll=0.5)
                rates[mode] = fleet.rate(job)
            finally:
                fleet.close()
        if rates:
            print(f"A alone: fair share off {rates['off']:.1f} items/s, on {rates['on']:.1f} "
                  f"items/s, ratio {rates['on'] / rates['off']:.3f} (the claim path's cost)")

        fleet = Fleet(svc, work / "mixed", fair_share=True, batch=a.batch)
        try:
            ta, tb = fleet.tenant("a"), fleet.tenant("b")
            keys_a, keys_b = upload(fleet, ta, paths), upload(fleet, tb, paths[:8])
            fleet.wait(fleet.submit(ta, keys_a, a.batch * 2)[0])  # warm-up
            if "latency" in parts:
                idle = []
                idle_seen: dict[str, datetime] = {}
                for _ in range(10):
                    job, t0 = fleet.submit(tb, keys_b, 1)
                    idle.append(fleet.wait(job) - t0)
                    idle_seen[job] = utcnow()
                    time.sleep(0.5)
                big, _ = fleet.submit(ta, keys_a, a.n)
                time.sleep(5)
                latencies: list[float] = []
                busy_seen: dict[str, datetime] = {}

                def b_job() -> None:
                    job, t0 = fleet.submit(tb, keys_b, 1)
                    latencies.append(fleet.wait(job) - t0)
                    busy_seen[job] = utcnow()

                threads = []
                for _ in range(a.b_jobs):
                    t = threading.Thread(target=b_job)
                    t.start()
                    threads.append(t)
                    time.sleep(1.0)
                for t in threads:
                    t.join()
                fleet.wait(big, poll=0.5)
                mixed = fleet.rate(big)
                idle_med, busy_med = statistics.median(idle), statistics.median(latencies)
                print(f"B's one-item jobs: idle fleet median {idle_med * 1000:.0f} ms; beside A's "
                      f"job median {busy_med * 1000:.0f} ms, p90 "
                      f"{sorted(latencies)[int(0.9 * (len(latencies) - 1))] * 1000:.0f} ms: "
                      f"{busy_med / idle_med:.2f}x idle (target <= 2)")
                alone = (f", {mixed / rates['on']:.3f} of A alone (target >= 0.9)"
                         if rates else "")
                print(f"A's throughput beside B: {mixed:.1f} items/s{alone}")
                spent = {label: latency_parts(fleet, seen)
                         for label, seen in (("idle", idle_seen), ("beside A", busy_seen))}
                for label, medians in spent.items():
                    print(f"  B's median {label}: " + ", ".join(
                        f"{name} {secs * 1000:.0f} ms" for name, secs in medians.items()))
                db_idle = spent["idle"]["created -> finished"]
                db_busy = spent["beside A"]["created -> finished"]
                print(f"B's one-item jobs in the database (created -> finished): idle median "
                      f"{db_idle * 1000:.0f} ms; beside A's job {db_busy * 1000:.0f} ms: "
                      f"{db_busy / db_idle:.2f}x idle (target <= 2)")

            if "weights" in parts:
                for wa in (1.0, 2.0):
                    with fleet.sf() as s:
                        jobs.set_limits(s, tenant_name="a", changes={"weight": wa})
                    since = utcnow()
                    job_a, _ = fleet.submit(ta, keys_a, pair)
                    job_b, _ = fleet.submit(tb, keys_b, pair)
                    first = min(fleet.wait(job_a, poll=0.5), fleet.wait(job_b, poll=0.5))
                    del first
                    # the windows while both had work: up to the first job's end
                    with fleet.sf() as s:
                        from sqlalchemy import func, select

                        from loom.models import Job

                        until = s.scalar(select(func.min(Job.finished_at))
                                         .where(Job.id.in_([job_a, job_b])))
                    got = shares_by_window(fleet, ta, tb, since, until)
                    want = wa / (wa + 1.0)
                    worst = max((abs(x - want) / want for x in got), default=float("nan"))
                    print(f"weights {wa:g}:1: A's share per 10 s window "
                          f"{', '.join(f'{x:.2f}' for x in got)} (want {want:.2f}); worst "
                          f"{worst:.1%} off (target within 10%)")

            if "limits" in parts:
                tc = fleet.tenant("c")
                with fleet.sf() as s:
                    jobs.set_limits(s, tenant_name="c", changes={"submissions_per_minute": 5})
                accepted = refused = 0
                for _ in range(8):
                    try:
                        with fleet.sf() as s:
                            jobs.submit_job(s, tenant_id=tc, task="caption", model_name="loom-shapes",
                                            items=[{"input": {"image_key": keys_a[0]}}],
                                            chunk_size=32, max_attempts=3, limits=jobs.Limits())
                        accepted += 1
                    except LimitExceeded:
                        refused += 1
                print(f"limits: per-minute limit 5, 8 submissions: {accepted} accepted, "
                      f"{refused} refused with 429")
        finally:
            fleet.close()
    finally:
        svc.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
