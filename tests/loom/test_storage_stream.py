"""Streaming writes: Store.put_chunks (S3 multipart against moto_server, local temp file +
rename) and the results manifest written through it with bounded memory."""

from __future__ import annotations

import hashlib
import json
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from loom import jobs, tenants
from loom.errors import StorageError
from loom.jobs.finalize import write_manifest
from loom.models import Item, Job, Output
from loom.s3 import MIN_PART_SIZE, S3Store, close_clients
from loom.storage import LocalStore, Store

KEY = "t1/jobs/j1/results.jsonl"
MIB = 1024 * 1024


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "local":
        yield LocalStore(tmp_path / "store")
        return
    yield from s3_store(request)


def s3_store(request: pytest.FixtureRequest) -> Iterator[S3Store]:
    bucket_url = request.getfixturevalue("s3_bucket")
    endpoint = request.getfixturevalue("s3_endpoint")
    try:
        yield S3Store.from_url(bucket_url, endpoint_url=endpoint, max_pool_connections=4,
                               part_size=MIN_PART_SIZE)
    finally:
        close_clients()  # no unclosed sockets (warnings are errors)


@pytest.fixture
def s3(request: pytest.FixtureRequest) -> Iterator[S3Store]:
    yield from s3_store(request)


def blocks(total: int, block: int = 256 * 1024) -> Iterator[bytes]:
    """Deterministic, incompressible-looking bytes, produced lazily."""
    n = 0
    while n < total:
        size = min(block, total - n)
        seed = hashlib.sha256(str(n).encode()).digest()
        yield (seed * (size // len(seed) + 1))[:size]
        n += size


def pending_uploads(s3: S3Store) -> list[object]:
    return list(s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []))


def test_put_chunks_round_trip(store: Store) -> None:
    assert store.put_chunks(KEY, [b"a\n", b"", b"bc\n"], "application/x-ndjson") == 5
    assert store.get(KEY) == b"a\nbc\n"
    assert store.put_chunks(KEY, iter([]), "application/x-ndjson") == 0  # empty object
    assert store.get(KEY) == b""


def test_s3_put_chunks_is_multipart_beyond_one_part(s3: S3Store) -> None:
    total = 2 * MIN_PART_SIZE + 123_457  # three parts, the last one short
    expected = hashlib.sha256(b"".join(blocks(total))).hexdigest()
    assert s3.put_chunks(KEY, blocks(total), "application/x-ndjson") == total
    head = s3.client.head_object(Bucket=s3.bucket, Key=s3._key(KEY))
    assert head["ContentLength"] == total
    assert head["ContentType"] == "application/x-ndjson"
    assert head["ETag"].strip('"').endswith("-3")  # S3's marker of a 3-part upload
    assert hashlib.sha256(s3.get(KEY)).hexdigest() == expected
    assert pending_uploads(s3) == []


def test_s3_put_chunks_failure_aborts_and_keeps_the_old_object(s3: S3Store) -> None:
    s3.put(KEY, b"old", "text/plain")

    def broken() -> Iterator[bytes]:
        yield from blocks(MIN_PART_SIZE + MIB)  # one part already uploaded
        raise RuntimeError("the database went away")

    with pytest.raises(RuntimeError):
        s3.put_chunks(KEY, broken())
    assert s3.get(KEY) == b"old"
    assert pending_uploads(s3) == []  # aborted: no orphaned parts


def test_local_put_chunks_failure_leaves_no_temp_file(tmp_path: Path) -> None:
    local = LocalStore(tmp_path / "store")
    local.put(KEY, b"old")

    def broken() -> Iterator[bytes]:
        yield b"new, half"
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        local.put_chunks(KEY, broken())
    assert local.get(KEY) == b"old"
    assert [p.name for p in (tmp_path / "store" / "t1/jobs/j1").iterdir()] == ["results.jsonl"]


def test_s3_put_chunks_store_error(s3_endpoint: str) -> None:
    missing = S3Store("no-such-bucket-loom", endpoint_url=s3_endpoint, max_pool_connections=2)
    try:
        with pytest.raises(StorageError):
            missing.put_chunks(KEY, blocks(10))
    finally:
        close_clients()


def test_s3_part_size_has_s3s_minimum() -> None:
    with pytest.raises(ValueError):
        S3Store("b", part_size=MIN_PART_SIZE - 1)


def _finished_job(session: Session, *, n: int, pad: int) -> Job:
    """A succeeded job of n items with pad bytes of metadata each (written in bulk; the manifest
    is what is under test, not the claim path)."""
    tenant = tenants.ensure_tenant(session, name="t")
    job = jobs.submit_job(
        session, tenant_id=tenant.id, task="caption", model_name="loom-shapes",
        items=[{"input": {"image_key": f"k/{i}.png"}, "metadata": {"file": f"{i}.png",
                                                                  "pad": "x" * pad}}
               for i in range(n)],
        chunk_size=1024, max_attempts=3)
    session.execute(update(Item).where(Item.job_id == job.id).values(status="succeeded"))
    ids = session.execute(
        Item.__table__.select().with_only_columns(Item.id).where(Item.job_id == job.id)
    ).scalars().all()
    session.execute(Output.__table__.insert(), [
        {"item_id": i, "job_id": job.id, "kind": "text", "text": f"caption {i}",
         "model_name": "loom-shapes", "model_version": "1", "weights_sha256": "ab" * 32,
         "task": "caption", "params": {}, "attempt": 1, "worker_id": "w", "timings": {}}
        for i in ids
    ])
    session.commit()
    return job


def test_manifest_streams_to_s3_in_parts_with_bounded_memory(
    session_factory: sessionmaker[Session], s3: S3Store
) -> None:
    n, pad = 12_000, 900  # ~13 MiB of manifest: three 5 MiB parts
    with session_factory() as session:
        job = _finished_job(session, n=n, pad=pad)
    with session_factory() as session:
        job = session.get(Job, job.id)
        assert job is not None
        # Warm up outside the measurement: botocore's service model alone is megabytes.
        assert not s3.exists("t/warm")
        tracemalloc.start()
        try:
            key = write_manifest(session, job=job, store=s3)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    body = s3.get(key)
    size = len(body)
    assert size > 2 * MIN_PART_SIZE
    head = s3.client.head_object(Bucket=s3.bucket, Key=s3._key(key))
    assert head["ETag"].strip('"').endswith("-3")
    lines = body.decode().splitlines()
    assert len(lines) == n
    first, last = json.loads(lines[0]), json.loads(lines[-1])
    assert (first["index"], last["index"]) == (0, n - 1)
    assert last["text"] == f"caption {last['item_id']}" and last["status"] == "succeeded"
    assert last["metadata"] == {"file": f"{n - 1}.png", "pad": "x" * pad}
    # Bounded by one part buffer plus one page of rows, whatever the job's size; building the
    # manifest in memory would need at least `size` (~13 MiB) for the text alone.
    assert peak < MIN_PART_SIZE + 6 * MIB, (peak, size)
    assert peak < size, (peak, size)


def test_manifest_streams_to_local_store_with_bounded_memory(
    session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    n, pad = 12_000, 900
    local = LocalStore(tmp_path / "store")
    with session_factory() as session:
        job = _finished_job(session, n=n, pad=pad)
    with session_factory() as session:
        job = session.get(Job, job.id)
        assert job is not None
        tracemalloc.start()
        try:
            key = write_manifest(session, job=job, store=local)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    size = len(local.get(key))
    assert size > 10 * MIB
    assert peak < 5 * MIB, (peak, size)  # a page of rows and one 256 KiB chunk, not the file
