"""The modes of bench/eta.py: what each one runs and measures (the bare model loop, the embedded
command, a distributed worker on a local store or S3, the S3 endpoint alone, Ray Data), each
returning a ``Result``. eta.py chooses which to run, in what order, and prints the report."""

from __future__ import annotations

import json
import multiprocessing as mp
import queue as queue_mod
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import (  # the shared bench helpers; importing it puts the project on sys.path
    MAX_PIXELS,
    ROOT,
    Services,
    env_for,
    loom_cmd,
    producer,
    stop_worker,
)

STAGES = ("claim", "fetch", "decode", "infer", "encode", "upload", "complete")
IO_THREADS = 4  # worker.engine.Engine's default I/O pool per process


@dataclass
class Result:
    task: str
    mode: str
    items: int
    seconds: float
    note: str = ""
    stages_ms: dict[str, float] = field(default_factory=dict)
    processes: int = 1
    against: float | None = None  # the rate this mode is judged against (default: the limit)
    # embedded: seconds from the command's start to its first claim and to its last result
    first_claim: float | None = None
    last_result: float | None = None
    # bare: seconds from spawning the processes until the slowest was ready to run (interpreter,
    # imports, model load), what a program that only ran this loop would also pay
    startup: float | None = None

    @property
    def rate(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0


# --- inputs ------------------------------------------------------------------------------------


# --- bare loop ---------------------------------------------------------------------------------


def _bare_child(task: str, work: list[Any], threads: int, batch: int, device: str,
                out_dir: str, barrier: Any, results: Any) -> None:
    import torch

    from loom import media
    from pipeline import registry
    from worker import sizing

    torch.set_num_threads(threads)
    sizing.tune_allocator()  # as Loom's engine processes do: part of the best configuration
    model = registry.load("loom-shapes", device=device)
    ready = time.perf_counter()  # CLOCK_MONOTONIC: comparable with the parent's clock

    def run(chunk: list[Any]) -> None:
        if task == "caption":
            images = [media.decode_image(Path(p).read_bytes(), max_pixels=MAX_PIXELS)
                      for p in chunk]
            model.caption(images)
        else:
            prompts = [p for _, p in chunk]
            for (i, _), img in zip(chunk, model.generate(prompts, [i for i, _ in chunk])):
                (Path(out_dir) / f"{i:05d}.png").write_bytes(media.encode_png(img))

    run(work[:batch])  # warm-up, not timed
    barrier.wait()
    t0 = time.perf_counter()
    for k in range(0, len(work), batch):
        run(work[k:k + batch])
    results.put((t0, time.perf_counter(), len(work), ready))


def bare(task: str, inputs: list[Any], processes: int, threads: int, batch: int, device: str,
         work: Path) -> Result:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    out = work / f"bare-{task}-{processes}x{threads}"
    out.mkdir(exist_ok=True)
    shares = [inputs[k::processes] for k in range(processes)]
    procs = [ctx.Process(target=_bare_child, args=(task, share, threads, batch, device, str(out),
                                                   barrier, results)) for share in shares]
    spawned = time.perf_counter()
    for p in procs:
        p.start()
    got: list[tuple[float, float, int, float]] = []
    try:
        while len(got) < len(procs):
            try:
                got.append(results.get(timeout=1.0))
            except queue_mod.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"bare {task} {processes}x{threads}: a process failed "
                                       f"(exit {dead[0]})") from None
    finally:
        for p in procs:
            if p.exitcode is None and len(got) < len(procs):
                p.terminate()
            p.join()
    t0, t1 = min(g[0] for g in got), max(g[1] for g in got)
    note = "model load not timed" + ("; PNG encode + write on the model thread"
                                     if task == "generate" else "")
    return Result(task, f"bare {processes}x{threads}", sum(g[2] for g in got), t1 - t0,
                  processes=processes, note=note, startup=max(g[3] for g in got) - spawned)


def bare_as_program(best: Result) -> Result:
    """The best bare loop as a program run from the shell would go: its processes' start-up
    (interpreter, torch import, model load) plus the timed loop. The embedded command pays the
    same start-up, which no torch program avoids; this row says what Loom adds to it."""
    assert best.startup is not None
    return Result(best.task, f"{best.mode} as program", best.items, best.startup + best.seconds,
                  processes=best.processes,
                  note=f"start-up {best.startup:.2f}s (interpreter, imports, model load) included")


# --- helpers for the Loom modes --------------------------------------------------------------


def read_stages(directory: Path) -> tuple[dict[str, float], int]:
    """Summed stage times of every engine's snapshot (``items``: the items they finished)."""
    total: dict[str, float] = {}
    files = 0
    for f in directory.glob("*.json"):
        try:
            snap = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        files += 1
        total["items"] = total.get("items", 0.0) + float(snap.get("items", 0))
        for k, v in snap.get("stages_ms", {}).items():
            total[k] = total.get(k, 0.0) + float(v)
    return total, files


def settled_stages(directory: Path, before: dict[str, float], n: int,
                   timeout: float = 10.0) -> tuple[dict[str, float], int]:
    """The snapshots once they account for ``n`` more items than ``before``: an engine writes its
    snapshot when its chunk run returns, which can be just after the job turned final."""
    deadline = time.monotonic() + timeout
    while True:
        after, procs = read_stages(directory)
        if after.get("items", 0.0) - before.get("items", 0.0) >= n or time.monotonic() > deadline:
            return after, procs
        time.sleep(0.05)


def embedded(task: str, n: int, work: Path, batch: int, device: str) -> Result:
    home = work / f"embedded-{task}-{secrets.token_hex(3)}"
    stages = home / "stages"
    env = env_for(home=home, device=device, batch_size=batch, stage_log=stages)
    # --no-cache: every mode must run the model (the same inputs go through each mode).
    if task == "caption":
        args = ["caption", str(work / "images"), "--out", str(home / "captions.jsonl"),
                "--no-cache"]
    else:
        args = ["generate", "--prompts", str(work / "prompts.txt"), "--out", str(home / "gen"),
                "--seed", "0", "--no-cache"]
    started = time.time()
    t0 = time.perf_counter()
    proc = subprocess.run([*loom_cmd(), *args], env=env, capture_output=True, text=True,
                          cwd=str(work))
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"loom {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    out = home / ("captions.jsonl" if task == "caption" else "gen/index.jsonl")
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    ok = sum(1 for r in rows if r.get("caption" if task == "caption" else "file"))
    if ok != n:
        raise RuntimeError(f"embedded {task}: {ok} of {n} items have an output")
    stage_ms, procs = read_stages(stages)
    first_claim, last_result = item_times(home / "loom.db", started)
    # The store stays until the end: thousands of files deleted just before the next mode
    # creates its own made ext4's inode allocator skip the recently freed inodes one by one
    # (6% of that mode's engine CPU, a cost the bare loop never paid).
    return Result(task, "embedded", n, seconds, stages_ms=stage_ms, processes=max(1, procs),
                  note=f"{procs} engine process(es); start-up and writing results included",
                  first_claim=first_claim, last_result=last_result)


def item_times(db: Path, started: float) -> tuple[float | None, float | None]:
    """Seconds from ``started`` (epoch) to the first claim and to the last result of an embedded
    run, read from its SQLite file after the run (no polling beside it)."""
    import sqlite3
    from datetime import datetime, timezone

    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            first, last = con.execute(
                "SELECT min(started_at), max(finished_at) FROM items").fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return None, None

    def since(value: str | None) -> float | None:
        if not value:
            return None
        when = datetime.fromisoformat(value).replace(tzinfo=timezone.utc)  # stored as naive UTC
        return when.timestamp() - started

    return since(first), since(last)


# --- distributed ---------------------------------------------------------------------------------


def distributed(task: str, paths: list[Path], prompts: list[str], svc: Services, work: Path,
                batch: int, device: str, s3: bool, invocations: int = 1) -> Result:
    """``invocations``: how many ``loom worker`` commands run side by side on this host (each
    plans for the whole host; worker.sizing's slots make them share it)."""
    from concurrent.futures import ThreadPoolExecutor
    from datetime import timezone

    from sqlalchemy import func, select

    from loom import jobs
    from loom.models import Item, Job
    from loom.storage import input_key

    mode = ("s3" if s3 else "local") + (f" x{invocations}" if invocations > 1 else "")
    stages = work / f"stages-{mode}-{task}-{secrets.token_hex(3)}"
    loom_env: dict[str, Any] = dict(
        home=work / "dist-home", database_url=svc.database_url, broker_url=svc.redis_url,
        storage_url=("s3://eta/loom" if s3 else f"file://{work / 'dist-store'}"),
        s3_endpoint_url=svc.start_moto() if s3 else None, auth="off", device=device,
        batch_size=batch, stage_log=stages)
    settings, store, db, sf, celery_app, publish, tenant = producer(loom_env)
    upload = secrets.token_hex(6)
    times: list[float | None] = [None, None]  # the last run's first claim and last result
    if task == "caption":
        def put(i: int) -> dict[str, Any]:
            key = input_key(tenant, upload, i, paths[i].suffix.lstrip("."))
            store.put(key, paths[i].read_bytes())
            return {"input": {"image_key": key}}

        with ThreadPoolExecutor(16) as pool:
            items = list(pool.map(put, range(len(paths))))
    else:
        items = [{"input": {"prompt": p, "seed": i}} for i, p in enumerate(prompts)]

    def run(some: list[dict[str, Any]]) -> tuple[str, float, float]:
        started = time.time()
        t0 = time.perf_counter()
        with sf() as s:
            job = jobs.submit_job(s, tenant_id=tenant, task=task, model_name=settings.default_model,
                                  items=some, chunk_size=settings.chunk_size,
                                  max_attempts=settings.max_attempts,
                                  use_cache=False)  # measure the model, not the result cache
            jobs.publish_pending(s, publish=publish, job_id=job.id)
        submitted = time.perf_counter() - t0
        while True:
            # The end is read from the job's row afterwards (finished_at), so the poll can be
            # as slow as a user's: polling 20 times a second took 1.4% of the machine from the
            # worker, a cost that measured the bench rather than Loom.
            with sf() as s:
                status = jobs.job_status(s, job_id=job.id)
            if status in ("succeeded", "completed_with_errors", "failed", "cancelled"):
                break
            for worker, log_path in workers:
                if worker.poll() is not None:
                    raise RuntimeError(
                        f"loom worker exited ({worker.returncode}); see {log_path}")
            time.sleep(0.25)
        if status != "succeeded":
            raise RuntimeError(f"{mode} {task} job ended {status}")
        with sf() as s:
            first, last, finished = s.execute(
                select(func.min(Item.started_at), func.max(Item.finished_at), Job.finished_at)
                .join(Job, Job.id == Item.job_id).where(Item.job_id == job.id)
                .group_by(Job.finished_at)).one()
        # Stored as naive UTC: seconds from the submission to the first claim, the last result
        # and the job's final status (the wall time).
        seconds = finished.replace(tzinfo=timezone.utc).timestamp() - started
        times[:] = [None if t is None else t.replace(tzinfo=timezone.utc).timestamp() - started
                    for t in (first, last)]
        return job.id, seconds, submitted

    workers: list[tuple[subprocess.Popen[bytes], Path]] = []
    for k in range(invocations):
        log_path = work / f"worker-{mode.replace(' ', '')}-{task}-{k}.log"
        with log_path.open("wb") as log:
            workers.append((subprocess.Popen(
                [*loom_cmd(), "worker", "-n", f"eta-{secrets.token_hex(3)}@%h", "-l", "warning"],
                env=env_for(**loom_env), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True), log_path))
    try:
        run(items[: batch * 2])  # warm-up: the processes are up and the model loaded
        before, _ = settled_stages(stages, {}, batch * 2)
        _, seconds, submitted = run(items)
        after, procs = settled_stages(stages, before, len(items))
    finally:
        for worker, _ in workers:
            stop_worker(worker)
        celery_app.close()
        db.dispose()
    diff = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    return Result(task, mode, len(items), seconds, stages_ms=diff, processes=max(1, procs),
                  note=f"submit {submitted:.2f}s", first_claim=times[0], last_result=times[1])


def store_rate(task: str, paths: list[Path], svc: Services, concurrency: int) -> Result:
    """The S3 endpoint alone: caption reads one object per item, generate writes one."""
    from concurrent.futures import ThreadPoolExecutor

    from loom.config import Settings
    from loom.storage import store_from_settings

    store = store_from_settings(Settings(storage_url="s3://eta/rate",
                                         s3_endpoint_url=svc.start_moto()))
    blobs = [p.read_bytes() for p in paths]
    keys = [f"rate/{task}/{i}" for i in range(len(blobs))]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda kb: store.put(kb[0], kb[1]), zip(keys, blobs)))
    put_s = time.perf_counter() - t0
    if task == "generate":
        return Result(task, f"store put x{concurrency}", len(keys), put_s,
                      note="the S3 endpoint alone")
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(store.get, keys))
    return Result(task, f"store get x{concurrency}", len(keys), time.perf_counter() - t0,
                  note="the S3 endpoint alone")


# --- Ray Data --------------------------------------------------------------------------------


def ray_data(task: str, paths: list[Path], prompts: list[str], processes: int, threads: int,
             batch: int, device: str) -> Result:
    import ray

    ray.init(num_cpus=processes * threads, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})

    class Model:
        def __init__(self) -> None:
            import torch

            from pipeline import registry

            torch.set_num_threads(threads)
            self.model = registry.load("loom-shapes", device=device)

        def __call__(self, rows: dict[str, Any]) -> dict[str, Any]:
            from loom import media

            if task == "caption":
                images = [media.decode_image(Path(p).read_bytes(), max_pixels=MAX_PIXELS)
                          for p in rows["path"]]
                return {"out": self.model.caption(images)}
            imgs = self.model.generate(list(rows["prompt"]), [int(s) for s in rows["seed"]])
            return {"out": [len(media.encode_png(i)) for i in imgs]}

    rows = ([{"path": str(p)} for p in paths] if task == "caption"
            else [{"prompt": p, "seed": i} for i, p in enumerate(prompts)])
    try:
        t0 = time.perf_counter()
        ds = ray.data.from_items(rows).map_batches(Model, batch_size=batch, concurrency=processes,
                                                   num_cpus=threads)
        n = sum(len(b["out"]) for b in ds.iter_batches(batch_size=batch))
        seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
    return Result(task, f"ray data {processes}x{threads}", n, seconds, note="model load included")
