"""Item 1 of issue 13, in-process: a store outage never fails an item or spends its attempts.

The store is the real LocalStore behind a switch that makes every call fail the way boto does
while S3 is down (StorageError), for a set time. max_attempts=1 and no backoff: before the fix,
the first failed read or upload ended the item ``failed`` (storage_error)."""

from __future__ import annotations

import threading
import time
from typing import Any

from sqlalchemy import func, select

from loom.errors import StorageError
from worker_helpers import FakeModel, shape_png, submit, tenant_id, upload_inputs


class OutageStore:
    """A real store with an outage window: every call raises StorageError until ``until``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.until = 0.0
        self.refused = 0
        self._lock = threading.Lock()

    def down_for(self, seconds: float) -> None:
        self.until = time.monotonic() + seconds

    def _check(self, key: str) -> None:
        if time.monotonic() < self.until:
            with self._lock:
                self.refused += 1
            raise StorageError(f"could not reach the store for {key}: connection refused")

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._check(key)
        self.inner.put(key, data, content_type)

    def get(self, key: str) -> bytes:
        self._check(key)
        return self.inner.get(key)

    def exists(self, key: str) -> bool:
        self._check(key)
        return bool(self.inner.exists(key))

    def url(self, key: str, expires_seconds: int = 3600) -> str | None:
        return self.inner.url(key, expires_seconds)

    def open_stream(self, key: str) -> Any:
        self._check(key)
        return self.inner.open_stream(key)

    def __getattr__(self, name: str) -> Any:
        """Every other store method (put_chunks, put_stream, delete, ...) fails the same way."""
        method = getattr(self.inner, name)

        def guarded(key: str, *args: Any, **kwargs: Any) -> Any:
            self._check(key)
            return method(key, *args, **kwargs)

        return guarded


def _run(embedded: Any, task: str, inputs: list[dict[str, Any]], store: OutageStore) -> Any:
    from worker.engine import Engine

    settings, sf, _ = embedded
    job_id = submit(sf, task=task, inputs=inputs, chunk_size=8, model="fake", max_attempts=1)
    store.down_for(1.5)
    with Engine(settings, session_factory=sf, store=store, worker_id="w-outage",
                model_loader=lambda name: FakeModel()) as engine:
        return engine.run_job(job_id)


def _released(sf: Any, job_id: str) -> int:
    from loom.models import Event

    with sf() as s:
        return int(s.scalar(select(func.count()).where(Event.job_id == job_id,
                                                       Event.kind == "released")) or 0)


def test_reads_during_a_store_outage_wait_instead_of_failing(embedded: Any) -> None:
    from loom.models import Item

    _, sf, local = embedded
    keys = upload_inputs(local, tenant_id(sf), [shape_png(i) for i in range(10)])
    store = OutageStore(local)
    job = _run(embedded, "caption", [{"image_key": k} for k in keys], store)
    assert job.status == "succeeded", job.status
    assert store.refused > 0 and _released(sf, job.id) > 0
    with sf() as s:
        rows = s.execute(select(Item.attempts, Item.attempts_excused)
                         .where(Item.job_id == job.id)).all()
    # Every item spent exactly one attempt (the one that succeeded); the rest were excused.
    assert {a - e for a, e in rows} == {1}


def test_uploads_during_a_store_outage_wait_instead_of_failing(embedded: Any) -> None:
    from loom.models import Output

    _, sf, local = embedded
    store = OutageStore(local)
    job = _run(embedded, "generate", [{"prompt": f"a red circle {i}", "seed": i}
                                      for i in range(10)], store)
    assert job.status == "succeeded", job.status
    assert store.refused > 0 and _released(sf, job.id) > 0
    with sf() as s:
        outs = list(s.scalars(select(Output).where(Output.job_id == job.id)))
    assert len(outs) == 10
    assert all(out.storage_key and local.exists(out.storage_key) for out in outs)


def test_a_missing_input_still_fails_its_item(embedded: Any) -> None:
    """InputMissing (no object) is about the item, not an outage: it ends input_missing."""
    from loom.models import Item

    _, sf, local = embedded
    keys = upload_inputs(local, tenant_id(sf), [shape_png(0)])
    store = OutageStore(local)
    job = _run(embedded, "caption", [{"image_key": keys[0]},
                                     {"image_key": keys[0][: -len("0.png")] + "9.png"}], store)
    assert job.status == "completed_with_errors"
    with sf() as s:
        codes = list(s.scalars(select(Item.error_code).where(Item.job_id == job.id)
                               .order_by(Item.index)))
    assert codes == [None, "input_missing"]


def test_an_input_that_differs_from_its_expected_sha256_fails(embedded: Any) -> None:
    import hashlib

    from loom.models import Item, Output

    _, sf, local = embedded
    data = shape_png(1)
    keys = upload_inputs(local, tenant_id(sf), [data, data])
    good = hashlib.sha256(data).hexdigest()
    store = OutageStore(local)
    job = _run(embedded, "caption", [{"image_key": keys[0], "sha256": good},
                                     {"image_key": keys[1], "sha256": "0" * 64}], store)
    with sf() as s:
        items = list(s.scalars(select(Item).where(Item.job_id == job.id).order_by(Item.index)))
        out = s.scalar(select(Output).where(Output.item_id == items[0].id))
    assert out is not None and out.input_sha256 == good
    assert items[1].error_code == "input_mismatch"
    assert good in (items[1].error_message or "") and "0" * 64 in (items[1].error_message or "")
