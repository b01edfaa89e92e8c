"""Real Celery worker processes against PostgreSQL, Redis (DB 15) and S3 (moto).

Each test starts its own workers (``celery -A worker.app worker`` subprocesses with LOOM_*
pointing at the test's database, broker and bucket), waits for the job by polling the database,
and always tears the workers down. Missing services skip locally and fail under CI=true.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import func, select

from worker_helpers import (
    TERMINAL,
    job_status,
    magenta_png,
    png_bomb,
    shape_png,
    submit,
    tenant_id,
    truncated_jpeg,
    upload_inputs,
    wait_for_job,
)

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def worker_app() -> str:
    """The production app, serving the shipped weights."""
    from fixtures_worker import require_model

    require_model()
    return "worker.app"


def rows(sf: Any, model: Any, job_id: str) -> list[Any]:
    with sf() as s:
        return list(s.scalars(select(model).where(model.job_id == job_id)))


def events(sf: Any, job_id: str, kind: str) -> list[Any]:
    from loom.models import Event

    with sf() as s:
        return list(s.scalars(select(Event).where(Event.job_id == job_id, Event.kind == kind)))


def assert_exactly_once(cluster: Any, job_id: str, n: int, *, kind: str) -> dict[int, Any]:
    """Every item succeeded once, with one output; S3 holds every object the DB points at."""
    from loom.models import Item, Output

    sf = cluster.session_factory
    items = rows(sf, Item, job_id)
    outputs = rows(sf, Output, job_id)
    assert len(items) == n
    assert {it.status for it in items} == {"succeeded"}
    assert len(outputs) == n and len({o.item_id for o in outputs}) == n
    by_item = {o.item_id: o for o in outputs}
    # attempts == 1 unless a lease expired for that item (recorded as an event).
    expired = {e.item_id for e in events(sf, job_id, "lease_expired")}
    for it in items:
        assert it.attempts == 1 or it.id in expired, (it.index, it.attempts)
        assert by_item[it.id].attempt == it.attempts
        assert by_item[it.id].kind == kind
    # Each item was completed by exactly one claim: one output (unique per item, checked above)
    # whose attempt is the item's last, and no other completion left a trace.
    assert events(sf, job_id, "succeeded") == []
    if kind == "image":

        def check(out: Any) -> None:
            data = cluster.store.get(out.storage_key)
            assert hashlib.sha256(data).hexdigest() == out.sha256
            assert data.startswith(b"\x89PNG") and len(data) == out.size_bytes

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(check, outputs))
    else:
        assert all(isinstance(o.text, str) for o in outputs)
    return by_item


def test_1000_generate_items_through_two_workers(
    cluster: Any, shapes_model: Any, worker_app: str
) -> None:
    n = 1000
    sf = cluster.session_factory
    cluster.pool.start("w1", app=worker_app)
    cluster.pool.start("w2", app=worker_app)
    prompts = ["a small red circle", "a large blue square left of a small green triangle",
               "a yellow triangle", "a purple square above an orange circle"]
    inputs = [{"prompt": prompts[i % len(prompts)], "seed": i} for i in range(n)]
    t0 = time.monotonic()
    job_id = submit(sf, task="generate", inputs=inputs, chunk_size=32, publish=cluster.publish)
    assert wait_for_job(sf, job_id, timeout=240, pool=cluster.pool) == "succeeded"
    wall = time.monotonic() - t0
    from loom.models import Job, ModelVersion, Output

    by_item = assert_exactly_once(cluster, job_id, n, kind="image")
    workers = {o.worker_id for o in by_item.values()}
    assert len(workers) == 2, workers  # both processes took chunks
    with sf() as s:
        job = s.get(Job, job_id)
        assert job.results_key and cluster.store.exists(job.results_key)
        assert s.scalar(select(func.count()).select_from(ModelVersion)) == 1
        infer_ms = s.scalars(select(Output.timings).where(Output.job_id == job_id)).all()
    # The model's raw speed on this machine, for comparison with the end-to-end rate.
    t1 = time.perf_counter()
    for b in range(0, 64, 8):
        shapes_model.generate(prompts[:4] * 2, list(range(b, b + 8)))
    raw = 64 / (time.perf_counter() - t1)
    batches = {round(t["infer_ms"], 3): t["infer_batch_size"] for t in infer_ms}
    in_worker = sum(batches.values()) / (sum(batches) / 1000.0)
    busy = (job.finished_at - job.started_at).total_seconds()
    print(
        f"\n[throughput] {n} generate items, 2 workers, batch 8, chunk 32: "
        f"{n / wall:.1f} items/s submit-to-done ({wall:.1f}s incl. worker start), "
        f"{n / busy:.1f} items/s first-claim-to-done ({busy:.1f}s); "
        f"model inside the workers {in_worker:.1f} items/s/worker; "
        f"raw model in-process (1 thread, no I/O) {raw:.1f} items/s"
    )


def test_small_jobs_share_batches_and_every_item_finishes_once(
    cluster: Any, worker_app: str
) -> None:
    """Sixteen 3-item jobs submitted together: a worker whose own job ran dry fills its batch
    (8 here) with the other jobs' items (loom.jobs.fill). Each item still finishes exactly once,
    every job finalizes, and at least one model call served several jobs."""
    from loom.models import Output

    sf = cluster.session_factory
    tenant = tenant_id(sf)
    keys = upload_inputs(cluster.store, tenant, [shape_png(i) for i in range(48)])
    ids = [submit(sf, task="caption", inputs=[{"image_key": k} for k in keys[j * 3:j * 3 + 3]],
                  chunk_size=32, publish=cluster.publish, tenant=tenant) for j in range(16)]
    cluster.pool.start("w1", app=worker_app)
    cluster.pool.start("w2", app=worker_app)
    for job_id in ids:
        assert wait_for_job(sf, job_id, timeout=120, pool=cluster.pool) == "succeeded"
    for job_id in ids:
        assert_exactly_once(cluster, job_id, 3, kind="text")
    with sf() as s:
        outs = s.execute(select(Output.job_id, Output.worker_id, Output.timings)
                         .where(Output.job_id.in_(ids))).all()
    calls: dict[tuple[str, float], set[str]] = {}
    for o in outs:
        calls.setdefault((o.worker_id, o.timings["infer_ms"]), set()).add(o.job_id)
    assert max(len(j) for j in calls.values()) >= 2, calls
    assert len(calls) < 16  # fewer model calls than jobs


def test_caption_inputs_from_s3_and_duplicate_delivery(
    cluster: Any, worker_app: str
) -> None:
    """The same chunk messages published twice: every item still runs exactly once."""
    sf = cluster.session_factory
    tenant = tenant_id(sf)
    keys = upload_inputs(cluster.store, tenant, [shape_png(i) for i in range(96)])

    def twice(chunk: Any) -> None:
        cluster.publish(chunk)
        cluster.publish(chunk)

    job_id = submit(sf, task="caption", inputs=[{"image_key": k} for k in keys], chunk_size=32,
                    publish=twice, tenant=tenant)
    cluster.pool.start("w1", app=worker_app)
    cluster.pool.start("w2", app=worker_app)
    assert wait_for_job(sf, job_id, timeout=120, pool=cluster.pool) == "succeeded"
    by_item = assert_exactly_once(cluster, job_id, 96, kind="text")
    from loom.models import Item

    items = {it.id: it for it in rows(sf, Item, job_id)}
    for item_id, out in by_item.items():
        assert out.input_sha256 == hashlib.sha256(shape_png(items[item_id].index)).hexdigest()
    # One claim per item (more only after a lease expired), as lineage shows them; and the
    # workers deleted each claim's lease row with its last item (none left over).
    from loom import jobs
    from loom.models import Lease

    with sf() as session:
        claims = sum(e["kind"] == "claimed" for i in items
                     for e in jobs.item_lineage(session, item_id=i)["events"])
        leftover = session.scalars(select(Lease).where(Lease.job_id == job_id)).all()
    assert claims == 96 + len(events(sf, job_id, "lease_expired"))
    assert leftover == []


def test_sigkill_mid_chunk_items_finish_elsewhere_with_attempt_2(
    cluster: Any, worker_app: str
) -> None:
    from loom.models import Item, Output

    sf = cluster.session_factory
    workers = [cluster.pool.start("w1", app=worker_app), cluster.pool.start("w2", app=worker_app)]
    n = 256  # 8 chunks of 32; a batch of 8 takes a noticeable moment on CPU
    job_id = submit(sf, task="generate", inputs=[{"prompt": "a red circle", "seed": i}
                                                  for i in range(n)],
                    chunk_size=32, publish=cluster.publish)
    # Wait until a worker is mid-chunk (items of its chunk done, others leased by it), freeze it
    # (SIGSTOP: the set of items it holds cannot change under our feet), then SIGKILL its whole
    # process group - the Celery parent and the prefork pool child that holds the leases.
    deadline = time.monotonic() + 120
    owner, victim, dead = "", [], None
    while not victim:
        assert time.monotonic() < deadline, cluster.pool.logs()
        assert job_status(sf, job_id) not in TERMINAL, "job ended before a worker was mid-chunk"
        with sf() as s:
            running = list(s.scalars(select(Item).where(Item.job_id == job_id,
                                                        Item.status == "running")))
            done = {(o.worker_id, it.index // 32) for o, it in s.execute(
                select(Output, Item).join(Item, Item.id == Output.item_id)
                .where(Output.job_id == job_id)).all()}
        owner = next((it.lease_owner for it in running
                      if (it.lease_owner, it.index // 32) in done), "")
        if not owner:
            time.sleep(0.05)
            continue
        pgid = os.getpgid(int(owner.split(":")[1]))
        (dead,) = [w for w in workers if w.pgid == pgid]
        os.killpg(pgid, signal.SIGSTOP)
        time.sleep(0.5)  # a commit already on the wire lands
        with sf() as s:
            victim = list(s.scalars(select(Item).where(Item.job_id == job_id,
                                                       Item.status == "running",
                                                       Item.lease_owner == owner)))
        if not victim:  # it had just finished a chunk: let it go on and try again
            os.killpg(pgid, signal.SIGCONT)
    assert dead is not None
    dead.kill()
    t_kill = time.monotonic()
    assert wait_for_job(sf, job_id, timeout=180, pool=cluster.pool) == "succeeded"
    print(f"\n[sigkill] {len(victim)} leased items at the kill; "
          f"job done {time.monotonic() - t_kill:.1f}s later")
    assert_exactly_once(cluster, job_id, n, kind="image")
    outs = {o.item_id: o for o in rows(sf, Output, job_id)}
    for it in victim:
        assert outs[it.id].attempt >= 2 and outs[it.id].worker_id != owner
    assert any(outs[it.id].attempt == 2 for it in victim)
    assert len(events(sf, job_id, "lease_expired")) >= len(victim)


def test_crash_between_commit_and_publish_reconciler_publishes(
    cluster: Any, worker_app: str
) -> None:
    sf = cluster.session_factory
    job_id = submit(sf, task="generate", inputs=[{"prompt": "a blue square"}] * 40,
                    chunk_size=16, publish=None)  # committed, never published
    cluster.pool.start("w1", app=worker_app)
    assert wait_for_job(sf, job_id, timeout=120, pool=cluster.pool) == "succeeded"
    assert_exactly_once(cluster, job_id, 40, kind="image")
    from loom.models import Outbox

    with sf() as s:
        boxes = list(s.scalars(select(Outbox).where(Outbox.job_id == job_id)))
    assert len(boxes) == 3 and all(b.published_at is not None for b in boxes)


def test_poison_input_that_kills_the_process_fails_after_the_cap(cluster: Any) -> None:
    from loom.models import Item

    sf = cluster.session_factory
    tenant = tenant_id(sf)
    blobs = [shape_png(i) for i in range(24)]
    blobs[10] = magenta_png()  # in the second batch of 8
    keys = upload_inputs(cluster.store, tenant, blobs)
    job_id = submit(sf, task="caption", inputs=[{"image_key": k} for k in keys], chunk_size=24,
                    max_attempts=3, publish=cluster.publish, tenant=tenant)
    w1 = cluster.pool.start("w1", app="poison_worker")
    assert wait_for_job(sf, job_id, timeout=200, pool=cluster.pool) == "completed_with_errors"
    items = {it.index: it for it in rows(sf, Item, job_id)}
    poison = items.pop(10)
    from loom.models import Event

    with sf() as s:
        history = [(e.kind, e.attempt, e.worker_id, e.error_code, str(e.created_at))
                   for e in s.scalars(select(Event).where(Event.item_id == poison.id)
                                      .order_by(Event.id))]
    assert (poison.status, poison.error_code, poison.attempts) == (
        "failed", "worker_lost", 3
    ), history
    assert all(it.status == "succeeded" for it in items.values())
    # Innocents lose at most the one attempt they shared with the poison; never the cap.
    assert max(it.attempts for it in items.values()) <= 2
    assert w1.alive()  # the Celery main process survived and kept replacing its pool child
    assert "WorkerLostError" in w1.log_path.read_text(errors="replace")


def test_bad_inputs_fail_alone_and_the_worker_keeps_going(
    cluster: Any, worker_app: str
) -> None:
    from loom.models import Item, Output

    sf = cluster.session_factory
    tenant = tenant_id(sf)
    bad = {1: os.urandom(4096), 3: truncated_jpeg(), 5: b"", 7: png_bomb(30_000),
           9: b"this is a text file that someone named photo.png\n"}
    blobs = [bad.get(i, shape_png(i)) for i in range(12)]
    keys = upload_inputs(cluster.store, tenant, blobs)
    job_id = submit(sf, task="caption", inputs=[{"image_key": k} for k in keys], chunk_size=32,
                    publish=cluster.publish, tenant=tenant,
                    metadata=[{"file": "photo.png"} for _ in keys])
    w1 = cluster.pool.start("w1", app=worker_app)
    assert wait_for_job(sf, job_id, timeout=120, pool=cluster.pool) == "completed_with_errors"
    items = {it.index: it for it in rows(sf, Item, job_id)}
    expected = {1: "invalid_input", 3: "invalid_input", 5: "invalid_input",
                7: "input_too_large", 9: "invalid_input"}
    for index, it in items.items():
        if index in expected:
            assert (it.status, it.error_code) == ("failed", expected[index]), index
            assert it.error_message and it.attempts == 1
        else:
            assert it.status == "succeeded", (index, it.error_code, it.error_message)
    # The same worker process then runs another job to the end.
    second = submit(sf, task="caption", inputs=[{"image_key": k} for k in keys[:1]] * 8,
                    chunk_size=32, publish=cluster.publish, tenant=tenant)
    assert wait_for_job(sf, second, timeout=60, pool=cluster.pool) == "succeeded"
    assert w1.alive()
    owners = {o.worker_id for o in rows(sf, Output, job_id) + rows(sf, Output, second)}
    assert len(owners) == 1, owners  # one pool process did both: it never died
