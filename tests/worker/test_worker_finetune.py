"""A finetune job in the engine (SQLite + LocalStore, the real base model): rows in, a registered
version out that the next job runs by name, with lineage back to the training rows; a stopped
run resumes from the checkpoint in storage; another tenant cannot use the model."""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

from sqlalchemy import select

from worker_helpers import submit, submit_finetune, tenant_id, upload_inputs

HYPER = {"steps": 4, "batch": 4, "replay": 1, "ckpt_every": 2}


def engine_for(embedded: Any, **kw: Any) -> Any:
    from worker.engine import Engine

    settings, sf, store = embedded
    return Engine(settings, session_factory=sf, store=store, worker_id=kw.pop("worker_id", "w"),
                  **kw)


def events(sf: Any, job_id: str, kind: str) -> list[dict[str, Any]]:
    from loom.models import Event

    with sf() as s:
        rows = s.scalars(select(Event.message).where(Event.job_id == job_id, Event.kind == kind)
                         .order_by(Event.id)).all()
    return [json.loads(m or "{}") for m in rows]


def pngs(rows: list[Any]) -> list[bytes]:
    out = []
    for r in rows:
        buf = io.BytesIO()
        r.image.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def test_a_finetune_job_registers_a_version_the_next_job_runs(embedded: Any) -> None:
    from loom import jobs
    from loom.models import Output, RegisteredModel
    from pipeline import finetune, registry

    settings, sf, store = embedded
    rows = finetune.labelled_rows(12, seed=3)
    job_id = submit_finetune(sf, store, rows=rows, name="shapes-ext", hyper=HYPER)
    with engine_for(embedded) as engine:
        assert engine.run_job(job_id).status == "succeeded"

        with sf() as s:
            (m,) = s.scalars(select(RegisteredModel)).all()
            out = s.scalar(select(Output).where(Output.job_id == job_id))
            item = jobs.list_items(s, job_id=job_id).items[0]
        assert (m.name, m.version, m.job_id, m.training_rows) == ("shapes-ext", 1, job_id, 12)
        assert m.training_sha256 == item.input["rows_sha256"]
        assert m.base_model == "loom-shapes@v1"
        assert m.base_weights_sha256 == registry.get("loom-shapes").sha256
        assert {"val_caption", "val_vqa", "new_words"} <= set(m.metrics)
        assert {"pink", "cyan", "diamond"} <= set(m.metrics["new_words"])
        assert m.hyperparameters["steps"] == 4
        weights = store.get(m.weights_key)
        assert hashlib.sha256(weights).hexdigest() == m.weights_sha256 == out.sha256
        assert (out.kind, out.text) == ("model", "shapes-ext@v1")
        started = events(sf, job_id, "training_started")
        assert started and started[0]["resumed_from_step"] == 0
        assert events(sf, job_id, "training")[-1]["step"] == 4
        # The job's event stream (GET /v1/jobs/{id}/events) carries the training events.
        from loom.jobs.stream import StreamState, poll

        with sf() as s:
            sse = poll(s, job_id=job_id, tenant_id=None, state=StreamState(), now=0.0)
        names = [e["event"] for e in sse]
        assert {"training_started", "training", "registered", "finished"} <= set(names)
        assert next(e for e in sse if e["event"] == "registered")["data"]["model"] == m.ref
        # Its result is a model, not a table of outputs: table exports say so.
        import pytest

        from loom import datasets, exports
        from loom.errors import InvalidRequest

        with sf() as s:
            jd = jobs.job_dict(jobs.get_job(s, job_id=job_id), jobs.job_progress(s, job_id=job_id))
        for export in (lambda: list(exports.stream("csv", [], job=jd, view="table")),
                       lambda: datasets.write_rows("parquet", [], settings.home / "x.parquet",
                                                   task="finetune")):
            with pytest.raises(InvalidRequest, match="model version"):
                export()

        # The next job names the version; its outputs say which weights, and their lineage
        # reaches the finetune job and the sha256 of its rows.
        tenant = tenant_id(sf)
        keys = upload_inputs(store, tenant, pngs(finetune.labelled_rows(2, seed=9)))
        cap = submit(sf, task="caption", inputs=[{"image_key": k} for k in keys], chunk_size=8,
                     model="shapes-ext@v1")
        assert engine.run_job(cap).status == "succeeded"
    with sf() as s:
        outs = s.scalars(select(Output).where(Output.job_id == cap)).all()
        assert {(o.model_name, o.model_version, o.weights_sha256) for o in outs} == {
            ("shapes-ext", "v1", m.weights_sha256)}
        lineage = jobs.item_lineage(s, item_id=outs[0].item_id, tenant_id=tenant)
    trained = lineage["trained_model"]
    assert trained["finetune_job_id"] == job_id and trained["ref"] == "shapes-ext@v1"
    assert trained["training_sha256"] == m.training_sha256


def test_another_tenant_cannot_run_it_and_a_second_run_is_v2(embedded: Any) -> None:
    from loom import jobs
    from pipeline import finetune

    settings, sf, store = embedded
    rows = finetune.labelled_rows(8, seed=4)
    with engine_for(embedded) as engine:
        for _ in range(2):
            engine.run_job(submit_finetune(sf, store, rows=rows, name="mine",
                                           hyper={**HYPER, "steps": 1}))
        other = tenant_id(sf, "someone-else")
        with sf() as s:
            assert jobs.resolve_model(s, tenant_id=tenant_id(sf), ref="mine").version == 2
            assert jobs.resolve_model(s, tenant_id=tenant_id(sf), ref="mine@v1").version == 1
            assert jobs.resolve_model(s, tenant_id=other, ref="mine") is None
        keys = upload_inputs(store, other, pngs(rows[:1]))
        theirs = submit(sf, task="caption", inputs=[{"image_key": keys[0]}], chunk_size=8,
                        model="mine@v2", tenant=other)
        job = engine.run_job(theirs)
    assert job.status == "failed"
    with sf() as s:
        (item,) = jobs.list_items(s, job_id=theirs).items
    assert item.error_code == "unsupported_task" and "mine@v2" in item.error_message


def test_a_stopped_run_resumes_from_its_checkpoint_in_storage(embedded: Any) -> None:
    from loom import storage
    from loom.models import Item
    from pipeline import finetune

    settings, sf, store = embedded
    job_id = submit_finetune(sf, store, rows=finetune.labelled_rows(8, seed=5), name="again",
                             hyper={**HYPER, "steps": 6})
    ckpt = storage.training_key(tenant_id(sf), job_id, "ckpt.pt")

    def stop() -> bool:  # Ctrl-C once the first checkpoint (step 2) is in the store
        return store.exists(ckpt)

    with engine_for(embedded, should_stop=stop, worker_id="first") as engine:
        engine.run_job(job_id)
    with sf() as s:
        item = s.scalars(select(Item).where(Item.job_id == job_id)).one()
        assert (item.status, item.lease_owner) == ("queued", None)  # lease given back
    with engine_for(embedded, worker_id="second") as engine:
        assert engine.run_job(job_id).status == "succeeded"
    started = events(sf, job_id, "training_started")
    assert [e["resumed_from_step"] for e in started][0] == 0
    assert started[-1]["resumed_from_step"] >= 2


def test_cancel_stops_training_between_steps(embedded: Any) -> None:
    import threading
    import time

    from loom import jobs
    from loom.models import RegisteredModel
    from pipeline import finetune

    settings, sf, store = embedded
    job_id = submit_finetune(sf, store, rows=finetune.labelled_rows(8, seed=7), name="never",
                             hyper={**HYPER, "steps": 400})

    def cancel_once_training() -> None:
        deadline = time.monotonic() + 120
        while not events(sf, job_id, "training") and time.monotonic() < deadline:
            time.sleep(0.1)
        with sf() as s:
            jobs.cancel_job(s, job_id=job_id)

    canceller = threading.Thread(target=cancel_once_training)
    canceller.start()
    with engine_for(embedded) as engine:
        job = engine.run_job(job_id)
    canceller.join()
    assert job.status == "cancelled"
    assert events(sf, job_id, "training")[-1]["step"] < 400
    with sf() as s:
        assert s.scalars(select(RegisteredModel)).all() == []


def test_rows_that_changed_after_submission_fail_the_job_once(embedded: Any) -> None:
    from loom import jobs
    from pipeline import finetune

    settings, sf, store = embedded
    job_id = submit_finetune(sf, store, rows=finetune.labelled_rows(4, seed=6), name="x",
                             hyper=HYPER)
    with sf() as s:
        (item,) = jobs.list_items(s, job_id=job_id).items
    store.put(item.input["rows_key"], b'{"image_key": "nope"}\n')
    with engine_for(embedded) as engine:
        assert engine.run_job(job_id).status == "failed"
    with sf() as s:
        (item,) = jobs.list_items(s, job_id=job_id).items
    assert (item.error_code, item.attempts) == ("input_mismatch", 1)
    assert "rows sha256" in item.error_message


def test_a_worker_killed_mid_training_is_resumed_by_another(cluster: Any) -> None:
    """Distributed: PostgreSQL, Redis, S3 and real `celery worker` processes. The first worker
    is SIGKILLed once a checkpoint is in the bucket; its lease expires and the second worker
    resumes from that step instead of starting over. One version is registered."""
    import time

    from loom import storage
    from loom.models import Output, RegisteredModel
    from pipeline import finetune
    from worker_helpers import wait_for_job

    sf, store = cluster.session_factory, cluster.store
    job_id = submit_finetune(sf, store, rows=finetune.labelled_rows(8, seed=8), name="ext",
                             hyper={**HYPER, "steps": 40, "ckpt_every": 5},
                             publish=cluster.publish)
    first = cluster.pool.start("w1")
    ckpt = storage.training_key(tenant_id(sf), job_id, "ckpt.pt")
    deadline = time.monotonic() + 180
    while not (store.exists(ckpt) and events(sf, job_id, "training")):
        assert time.monotonic() < deadline, cluster.pool.logs()
        assert first.alive(), cluster.pool.logs()
        time.sleep(0.2)
    first.kill()
    cluster.pool.start("w2")
    assert wait_for_job(sf, job_id, timeout=240, pool=cluster.pool) == "succeeded"
    started = events(sf, job_id, "training_started")
    assert started[0]["resumed_from_step"] == 0
    assert started[-1]["resumed_from_step"] >= 5 and started[-1]["attempt"] == 2
    with sf() as s:
        (m,) = s.scalars(select(RegisteredModel).where(RegisteredModel.job_id == job_id)).all()
        out = s.scalar(select(Output).where(Output.job_id == job_id))
    assert out.attempt == 2 and "w2@" in out.worker_id and out.text == m.ref == "ext@v1"
    assert m.metrics["resumed_from_step"] >= 5
