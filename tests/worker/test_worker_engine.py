"""The Engine in-process on SQLite + LocalStore (PostgreSQL where a test needs it: batch fill),
with a fake model (fast, no services). Its input stage: test_worker_inputs.py."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from sqlalchemy import func, select, update

from worker_helpers import (
    FakeModel,
    expire_leases,
    items_of,
    magenta_png,
    make_engine_,
    outputs_of,
    shape_png,
    submit,
    tenant_id,
    upload_inputs,
)


def test_caption_job_runs_with_lineage(embedded: Any) -> None:
    settings, sf, store = embedded
    tenant = tenant_id(sf)
    keys = upload_inputs(store, tenant, [shape_png(i) for i in range(10)])
    job_id = submit(sf, task="caption", inputs=[{"image_key": k} for k in keys], chunk_size=8,
                    model="fake")
    model = FakeModel()
    seen: list[int] = []
    with make_engine_(embedded, model) as engine:
        job = engine.run_job(job_id, progress=seen.append)
    assert job.status == "succeeded"
    assert sum(seen) == 10
    assert all(n <= settings.batch_size for _, n in model.calls)
    outs = outputs_of(sf, job_id)
    assert len(outs) == 10
    for out in outs:
        assert out.kind == "text" and out.text == "a 64x64 picture"
        assert out.sha256 == hashlib.sha256(out.text.encode()).hexdigest()
        assert out.model_version == "0.0.1" and out.weights_sha256 == "f" * 64
        assert out.worker_id == "w-test" and out.attempt == 1 and out.task == "caption"
        assert len(out.input_sha256) == 64
        assert {"fetch_ms", "decode_ms", "infer_ms"} <= set(out.timings)
    from loom.models import ModelVersion

    with sf() as s:
        assert s.scalar(select(func.count()).select_from(ModelVersion)) == 1
    assert job.results_key and store.exists(job.results_key)


def test_generate_uploads_png_before_pointing_at_it(embedded: Any) -> None:
    from worker.inputs import derive_seed

    _, sf, store = embedded
    inputs: list[dict[str, Any]] = [{"prompt": f"a red circle {i}", "seed": i} for i in range(5)]
    inputs.append({"prompt": "no seed given"})
    job_id = submit(sf, task="generate", inputs=inputs, chunk_size=8, model="fake")
    with make_engine_(embedded, FakeModel()) as engine:
        assert engine.run_job(job_id).status == "succeeded"
    by_item = {o.item_id: o for o in outputs_of(sf, job_id)}
    for item in items_of(sf, job_id):
        out = by_item[item.id]
        data = store.get(out.storage_key)
        assert data.startswith(b"\x89PNG") and hashlib.sha256(data).hexdigest() == out.sha256
        assert out.content_type == "image/png" and out.size_bytes == len(data)
        expected = item.input.get("seed", derive_seed(job_id, item.index))
        assert out.seed == expected
    assert derive_seed(job_id, 5) == derive_seed(job_id, 5) != derive_seed(job_id, 4)


def test_unknown_model_fails_items_not_the_worker(embedded: Any) -> None:
    from worker.engine import Engine

    settings, sf, store = embedded
    job_id = submit(sf, task="generate", inputs=[{"prompt": "x"}] * 3, chunk_size=8,
                    model="no-such-model")
    with Engine(settings, session_factory=sf, store=store, worker_id="w") as engine:
        job = engine.run_job(job_id)
    assert job.status == "failed"
    assert {(it.status, it.error_code) for it in items_of(sf, job_id)} == {
        ("failed", "unsupported_task")
    }
    assert "no-such-model" in (items_of(sf, job_id)[0].error_message or "")


def test_model_errors_retry_then_fail_at_the_cap(embedded: Any) -> None:
    _, sf, store = embedded
    tenant = tenant_id(sf)
    keys = upload_inputs(store, tenant, [shape_png(0), magenta_png(), shape_png(2)])
    job_id = submit(sf, task="caption", inputs=[{"image_key": k} for k in keys], chunk_size=8,
                    model="fake", max_attempts=2)
    model = FakeModel(fail_on=lambda im: im.size == (7, 7))
    with make_engine_(embedded, model) as engine:
        job = engine.run_job(job_id, poll_seconds=0.05)
    got = {it.index: (it.status, it.error_code, it.attempts) for it in items_of(sf, job_id)}
    # First attempt: the batch call raised -> all three retried; second attempt: each runs
    # alone (attempts > 1), so only the bad one fails again and hits the cap.
    assert got == {0: ("succeeded", None, 2), 1: ("failed", "model_error", 2),
                   2: ("succeeded", None, 2)}
    assert job.status == "completed_with_errors"
    assert ("caption", 3) in model.calls and model.calls.count(("caption", 1)) == 3


def test_items_whose_worker_died_run_one_at_a_time(embedded: Any) -> None:
    from loom import jobs

    settings, sf, store = embedded
    tenant = tenant_id(sf)
    keys = upload_inputs(store, tenant, [shape_png(i) for i in range(8)])
    job_id = submit(sf, task="caption", inputs=[{"image_key": k} for k in keys], chunk_size=8,
                    model="fake")
    with sf() as s:  # a worker claimed the first batch, then died (its lease expired)
        dead = jobs.claim_items(s, job_id=job_id, start=0, end=8, worker_id="dead", limit=4,
                                lease_seconds=30)
        expire_leases(s, [d.id for d in dead])
    model = FakeModel()
    with make_engine_(embedded, model) as engine:
        report = engine.run_chunk(jobs.Chunk(job_id, 0, 8))
    assert report.succeeded == 8
    assert model.calls == [("caption", 1)] * 4 + [("caption", 4)]
    assert {it.index: it.attempts for it in items_of(sf, job_id)} == {
        i: (2 if i < 4 else 1) for i in range(8)
    }


def test_fencing_a_taken_over_lease_drops_the_stale_result(embedded: Any) -> None:
    from loom import jobs
    from loom.models import Item

    _, sf, store = embedded
    job_id = submit(sf, task="generate", inputs=[{"prompt": "p", "seed": 1}] * 4, chunk_size=8,
                    model="fake")

    class Stalled(FakeModel):
        def generate(self, prompts: list[str], seeds: list[int]) -> list[Any]:
            # We stall past our lease; another worker takes the items over (attempt 2).
            with sf() as s:
                expire_leases(s, [i.id for i in s.query(Item).filter(Item.job_id == job_id)])
                taken = jobs.claim_items(s, job_id=job_id, start=0, end=8, worker_id="other",
                                         limit=8, lease_seconds=60)
            assert len(taken) == 4
            return super().generate(prompts, seeds)

    with make_engine_(embedded, Stalled()) as engine:
        report = engine.run_chunk(jobs.Chunk(job_id, 0, 8))
    assert (report.succeeded, report.fenced) == (0, 4), report
    assert outputs_of(sf, job_id) == []
    assert {(it.status, it.lease_owner, it.attempts) for it in items_of(sf, job_id)} == {
        ("running", "other", 2)
    }


def test_cancel_between_batches(embedded: Any) -> None:
    from loom import jobs

    _, sf, store = embedded
    job_id = submit(sf, task="generate", inputs=[{"prompt": "p"}] * 16, chunk_size=16,
                    model="fake")

    class Canceller(FakeModel):
        def generate(self, prompts: list[str], seeds: list[int]) -> list[Any]:
            if not self.calls:
                with sf() as s:
                    jobs.cancel_job(s, job_id=job_id)
            return super().generate(prompts, seeds)

    with make_engine_(embedded, Canceller()) as engine:
        report = engine.run_chunk(jobs.Chunk(job_id, 0, 16))
        # The first claim (claim_batches = 2 batches of 4); the next claim, made beside the
        # second batch, sees the cancel.
        assert report.claimed <= 8
    counts: dict[str, int] = {}
    for it in items_of(sf, job_id):
        counts[it.status] = counts.get(it.status, 0) + 1
    # The batch that saw the cancel, and the next one when its claim (made beside the model, so
    # that the model thread never waits on a status query) came before the cancel.
    assert counts.get("succeeded", 0) in (4, 8) and counts.get("running", 0) == 0
    assert counts["cancelled"] == 16 - counts["succeeded"]
    with sf() as s:
        assert jobs.get_job(s, job_id=job_id).status == "cancelled"


@pytest.mark.parametrize("claim_batches", [1, 2, 3])
def test_one_claim_takes_claim_batches_batches_and_runs_them_one_by_one(
        embedded: Any, claim_batches: int) -> None:
    """A claim statement takes ``claim_batches`` batches (its fixed cost paid once for them);
    the model still sees batches of ``batch_size``. One claim stamps its items' started_at."""
    from loom import jobs
    from worker.engine import Engine

    settings, sf, store = embedded
    settings = settings.model_copy(update={"claim_batches": claim_batches})
    job_id = submit(sf, task="generate", inputs=[{"prompt": "p"}] * 18, chunk_size=18,
                    model="fake")
    model = FakeModel()
    with Engine(settings, session_factory=sf, store=store, worker_id="w-claims",
                model_loader=lambda name: model) as engine:
        report = engine.run_chunk(jobs.Chunk(job_id, 0, 18))
    assert (report.claimed, report.succeeded) == (18, 18)
    assert model.calls == [("generate", 4)] * 4 + [("generate", 2)]  # batch_size 4
    claims: dict[Any, list[int]] = {}
    for it in sorted(items_of(sf, job_id), key=lambda it: it.index):
        claims.setdefault(it.started_at, []).append(it.index)
    per_claim = 4 * claim_batches
    assert sorted(len(c) for c in claims.values()) == sorted(
        [per_claim] * (18 // per_claim) + ([18 % per_claim] if 18 % per_claim else []))
    assert all(c == list(range(c[0], c[0] + len(c))) for c in claims.values())


@pytest.mark.parametrize("linger", [10.0, 0.0])
def test_a_chunk_run_goes_on_with_the_rest_of_its_job(embedded: Any, linger: float) -> None:
    """After its chunk runs dry a process keeps claiming the job's queued items (no drain and no
    broker round trip per chunk); the other chunks' messages then find nothing. With
    chunk_linger_seconds=0 it claims from its chunk only."""
    from loom import jobs
    from worker.engine import Engine

    settings, sf, store = embedded
    settings = settings.model_copy(update={"chunk_linger_seconds": linger})
    job_id = submit(sf, task="generate", inputs=[{"prompt": "p"}] * 24, chunk_size=8,
                    model="fake")
    with Engine(settings, session_factory=sf, store=store, worker_id="w-linger",
                model_loader=lambda name: FakeModel()) as engine:
        first = engine.run_chunk(jobs.Chunk(job_id, 8, 16))
        rest = [engine.run_chunk(jobs.Chunk(job_id, a, a + 8)) for a in (0, 16)]
    if linger:
        assert (first.claimed, first.succeeded, first.lingered) == (24, 24, 16)
        assert [r.claimed for r in rest] == [0, 0]
    else:
        assert (first.claimed, first.lingered) == (8, 0)
        assert [r.claimed for r in rest] == [8, 8]
    assert {it.status for it in items_of(sf, job_id)} == {"succeeded"}
    with sf() as s:
        assert jobs.get_job(s, job_id=job_id).status == "succeeded"


def test_embedded_run_job_64_captions_with_the_real_model(embedded: Any, shapes_model: Any) -> None:
    """The embedded default: SQLite + LocalStore + Engine.run_job in-process, the shapes model."""
    from worker.engine import Engine

    settings, sf, store = embedded
    tenant = tenant_id(sf)
    keys = upload_inputs(store, tenant, [shape_png(i) for i in range(64)])
    job_id = submit(sf, task="caption", inputs=[{"image_key": k} for k in keys], chunk_size=8)
    seen: list[int] = []
    with Engine(settings, session_factory=sf, store=store, worker_id="embedded",
                model_loader=lambda name: shapes_model) as engine:
        job = engine.run_job(job_id, progress=seen.append)
    assert job.status == "succeeded" and sum(seen) == 64
    outs = outputs_of(sf, job_id)
    assert len(outs) == 64 and {o.kind for o in outs} == {"text"}
    assert all(isinstance(o.text, str) for o in outs)
    info = shapes_model.info
    assert {(o.model_name, o.model_version, o.weights_sha256) for o in outs} == {
        (info.name, info.version, info.weights_sha256)
    }
    manifest = store.get(job.results_key).decode().splitlines()
    assert len(manifest) == 64


def test_run_job_ends_items_a_crashed_embedded_run_left_at_the_cap(embedded: Any) -> None:
    """An earlier embedded run died holding leases: under the cap they run again, at the cap
    they end failed (worker_lost); run_job never spins forever."""
    from loom import jobs
    from loom.models import Item

    _, sf, store = embedded
    job_id = submit(sf, task="generate", inputs=[{"prompt": "p"}] * 4, chunk_size=8,
                    model="fake", max_attempts=2)
    with sf() as s:
        dead = jobs.claim_items(s, job_id=job_id, start=0, end=8, worker_id="dead", limit=2,
                                lease_seconds=30)
        s.execute(update(Item).where(Item.id == dead[0].id).values(attempts=2))
        expire_leases(s, [d.id for d in dead])
    with make_engine_(embedded, FakeModel()) as engine:
        job = engine.run_job(job_id, poll_seconds=0.05)
    assert job.status == "completed_with_errors"
    got = {it.index: (it.status, it.error_code) for it in items_of(sf, job_id)}
    assert got == {0: ("failed", "worker_lost"), 1: ("succeeded", None),
                   2: ("succeeded", None), 3: ("succeeded", None)}


def test_items_retried_after_io_errors_still_run_in_batches(embedded: Any) -> None:
    from loom import jobs
    from loom.errors import FetchFailed

    _, sf, store = embedded
    job_id = submit(sf, task="generate", inputs=[{"prompt": "p"}] * 8, chunk_size=8,
                    model="fake", max_attempts=3)
    with sf() as s:  # first attempt: the fetch of every item failed transiently
        claimed = jobs.claim_items(s, job_id=job_id, start=0, end=8, worker_id="w0", limit=8,
                                   lease_seconds=30)
        jobs.fail_items(s, worker_id="w0", backoff_seconds=0, failures=[
            jobs.ItemFailure(item_id=c.id, error=FetchFailed("503"), attempt=c.attempts)
            for c in claimed
        ])
    model = FakeModel()
    with make_engine_(embedded, model) as engine:
        assert engine.run_job(job_id).status == "succeeded"
    assert model.calls == [("generate", 4), ("generate", 4)]


def test_a_suspect_is_never_claimed_while_another_batch_is_in_flight(embedded: Any) -> None:
    from loom import jobs
    from worker.batches import ChunkReport, Scope

    _, sf, store = embedded
    job_id = submit(sf, task="generate", inputs=[{"prompt": "p"}] * 8, chunk_size=8, model="fake")
    with sf() as s:
        (dead,) = jobs.claim_items(s, job_id=job_id, start=5, end=6, worker_id="dead", limit=1,
                                   lease_seconds=30)
        expire_leases(s, [dead.id])
    chunk = jobs.Chunk(job_id, 0, 8)
    with make_engine_(embedded, FakeModel()) as engine:
        report = ChunkReport(job_id, 0, 8)
        scope = Scope(chunk, linger_until=0.0)
        assert engine.claimer.claim(scope, report, prefetch=True) == []  # nothing leased meanwhile
        (batch,) = engine.claimer.claim(scope, report)
        assert batch.careful and [i.index for i in batch.items] == [5]
        assert batch.prepared == []  # read + decoded only when it runs, alone
    assert report.claimed == 1


def test_a_message_whose_items_were_taken_fills_from_compatible_jobs(
    pg_url: str, make_settings: Any, tmp_path: Any
) -> None:
    """PostgreSQL (fill needs it): a message finds its own items already taken (another process
    filled or lingered over them). It does not end empty-handed while compatible jobs wait: it
    fills its batches from them at once, and their own messages then find nothing."""
    from loom import jobs
    from loom.db import make_engine, make_session_factory
    from loom.storage import LocalStore
    from worker.engine import Engine

    eng = make_engine(pg_url)
    sf = make_session_factory(eng)
    settings = make_settings(database_url=pg_url, storage_url=f"file://{tmp_path / 'store'}",
                             batch_size=4, chunk_batches=2, retry_backoff_seconds=0)
    store = LocalStore(str(tmp_path / "store"))
    try:
        taken = submit(sf, task="generate", inputs=[{"prompt": "p"}] * 2, chunk_size=8,
                       model="fake")
        waiting = [submit(sf, task="generate", inputs=[{"prompt": "q"}] * 3, chunk_size=8,
                          model="fake") for _ in range(2)]
        with sf() as s:
            assert len(jobs.claim_items(s, job_id=taken, start=0, end=2, worker_id="elsewhere",
                                        limit=8, lease_seconds=60)) == 2
        with Engine(settings, session_factory=sf, store=store, worker_id="w-fill",
                    model_loader=lambda name: FakeModel()) as engine:
            report = engine.run_chunk(jobs.Chunk(taken, 0, 2))
            after = [engine.run_chunk(jobs.Chunk(j, 0, 3)) for j in waiting]
        assert (report.claimed, report.filled, report.succeeded) == (6, 6, 6)
        assert [r.claimed for r in after] == [0, 0]
        with sf() as s:
            assert [jobs.get_job(s, job_id=j).status for j in waiting] == ["succeeded"] * 2
            assert jobs.get_job(s, job_id=taken).status == "running"  # its items are elsewhere
    finally:
        eng.dispose()
