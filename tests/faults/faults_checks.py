"""The fault suite's stack handle and the ONE invariant check every scenario ends with.

``check_invariants(stack, job_id)``: the job and each item terminal (none left running), one
output per succeeded item with its object present and its sha256 matching, job counts equal to
item rows. The ``scenario`` fixture adds: 0 unexpected 5xx, 0 hits on the loopback trap."""

from __future__ import annotations

import base64
import hashlib
import io
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from faults_services import MotoServer, PostgresCluster, RedisServer, TrapServer, Worker

# Short leases, so that failures show within seconds (shorter than issue 13's 20/5/5/20/3).
LEASE_SECONDS = 10
TIMINGS: dict[str, Any] = dict(
    lease_seconds=LEASE_SECONDS, heartbeat_seconds=2, reconcile_interval_seconds=2,
    stale_chunk_seconds=8, max_attempts=3, retry_backoff_seconds=0.2,
)
TERMINAL_JOB = {"succeeded", "completed_with_errors", "failed", "cancelled"}
TERMINAL_ITEM = {"succeeded", "failed", "cancelled"}


def scene_png(i: int, size: int = 48) -> bytes:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), (240, 240, 235))
    colour = [(220, 30, 30), (30, 170, 60), (40, 70, 220)][i % 3]
    x0 = 4 + (i * 5) % 16
    (ImageDraw.Draw(im).ellipse if i % 2 else ImageDraw.Draw(im).rectangle)(
        (x0, 10, x0 + 20, 30), fill=colour)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def png_bomb(side: int = 30_000) -> bytes:
    """A valid 1-bit side x side PNG of zeros: ~110 KB on disk, ~900 M pixels decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))

    row = b"\x00" * (1 + (side + 7) // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row * 1000) for _ in range(side // 1000)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body)
            + chunk(b"IEND", b""))


def truncated_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.effect_noise((128, 128), 64).convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class Stack:
    url: str
    settings: Any
    session_factory: Any
    store: Any
    keys: dict[str, str]
    tenant_ids: dict[str, str]
    redis: RedisServer
    pg: PostgresCluster
    moto: MotoServer
    bucket: str
    trap: TrapServer
    workers: list[Worker]
    worker_env: dict[str, str]
    tmp: Path
    # Answers >= 500 other than 503 (503 service_unavailable is the right answer while a
    # dependency is down).
    server_errors: list[str] = field(default_factory=list)

    # --- HTTP -------------------------------------------------------------------------------

    @contextmanager
    def http(self, tenant: str = "alpha") -> Iterator[httpx.Client]:
        def record(response: httpx.Response) -> None:
            if response.status_code >= 500 and response.status_code != 503:
                response.read()
                self.server_errors.append(
                    f"{response.request.method} {response.request.url.path} -> "
                    f"{response.status_code} {response.text[:300]}")

        with httpx.Client(base_url=self.url, timeout=60,
                          headers={"Authorization": f"Bearer {self.keys[tenant]}"},
                          event_hooks={"response": [record]}) as client:
            yield client

    def submit(self, task: str, items: list[dict[str, Any]], *, tenant: str = "alpha",
               headers: dict[str, str] | None = None, **body: Any) -> dict[str, Any]:
        with self.http(tenant) as c:
            r = c.post("/v1/jobs", json={"task": task, "items": items, **body},
                       headers=headers or {})
        assert r.status_code in (200, 201, 202), r.text
        return dict(r.json())

    def generate_job(self, n: int, *, tenant: str = "alpha") -> str:
        return str(self.submit("generate", [{"prompt": f"a red circle {i}", "seed": i}
                                            for i in range(n)], tenant=tenant)["id"])

    def caption_job(self, n: int, *, tenant: str = "alpha") -> str:
        return str(self.submit("caption", [{"image_base64": b64(scene_png(i))}
                                           for i in range(n)], tenant=tenant)["id"])

    # --- the database, read directly (works while Redis or the API is down) ------------------

    def counts(self, job_id: str) -> dict[str, int]:
        from loom.models import Item

        with self.session_factory() as s:
            return {str(k): int(v) for k, v in s.execute(
                select(Item.status, func.count()).where(Item.job_id == job_id)
                .group_by(Item.status)).all()}

    def job_status(self, job_id: str) -> str:
        from loom.models import Job

        with self.session_factory() as s:
            return str(s.scalar(select(Job.status).where(Job.id == job_id)))

    def wait_succeeded(self, job_id: str, n: int, timeout: float = 60) -> None:
        """Until at least ``n`` items of the job succeeded (to time a fault mid-job)."""
        deadline = time.monotonic() + timeout
        while self.counts(job_id).get("succeeded", 0) < n:
            if time.monotonic() > deadline:
                pytest.fail(f"{job_id}: fewer than {n} succeeded after {timeout}s: "
                            f"{self.counts(job_id)}\n{self.logs()}")
            time.sleep(0.2)

    def wait_job(self, job_id: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = self.job_status(job_id)
            except Exception:  # noqa: BLE001 - the database may be down in this scenario
                status = "unknown"
            if status in TERMINAL_JOB:
                return status
            if time.monotonic() > deadline:
                pytest.fail(f"job {job_id} still {status} after {timeout}s: "
                            f"{self.counts(job_id)}\n{self.logs()}")
            time.sleep(0.3)

    # --- services and workers ---------------------------------------------------------------

    def restart_moto_empty(self) -> None:
        """moto keeps everything in memory: it comes back with no bucket and no objects."""
        self.moto.start()
        self.moto.create_bucket(self.bucket)

    def restore(self) -> None:
        self.redis.ensure_running()
        self.pg.ensure_running()
        if not self.moto.running:
            self.restart_moto_empty()
        for w in self.workers:
            if w.alive:
                w.signal(signal.SIGCONT)  # a scenario may have stopped it
            else:
                self.restart_worker(w)
        self.wait_for_workers()

    def wait_for_workers(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            ready = [w for w in self.workers
                     if w.alive and "ready." in w.log_path.read_text(errors="replace")
                     .split("--- restart ---")[-1]]
            if len(ready) == len(self.workers):
                return
            if time.monotonic() > deadline:
                pytest.fail(f"workers not ready after {timeout}s\n{self.logs()}")
            time.sleep(0.3)

    def restart_worker(self, w: Worker) -> None:
        with open(w.log_path, "a") as f:
            f.write("\n--- restart ---\n")
        w.start()

    def logs(self) -> str:
        return "\n".join(w.logs() for w in self.workers)


def check_invariants(stack: Stack, job_id: str, *, allow_failed: bool = False) -> dict[str, int]:
    """What every scenario must leave behind. Returns the item counts by status."""
    from loom.errors import InputMissing
    from loom.models import Item, Job, Output

    status = stack.wait_job(job_id)
    with stack.session_factory() as s:
        job = s.get(Job, job_id)
        assert job is not None
        items = list(s.scalars(select(Item).where(Item.job_id == job_id)))
        outputs: dict[int, list[Output]] = {}
        for out in s.scalars(select(Output).where(Output.job_id == job_id)):
            outputs.setdefault(out.item_id, []).append(out)
    counts: dict[str, int] = {}
    for it in items:
        counts[it.status] = counts.get(it.status, 0) + 1
    assert status in TERMINAL_JOB
    assert len(items) == job.item_count, "job item_count differs from its item rows"
    assert set(counts) <= TERMINAL_ITEM, f"items not terminal: {counts}"
    assert counts.get("running", 0) == 0
    if not allow_failed:
        failed = [(it.index, it.error_code, it.error_message) for it in items
                  if it.status == "failed"]
        assert not failed, f"{len(failed)} failed items, e.g. {failed[:3]}"
    # The API's counts agree with the rows.
    with stack.http(_tenant_of(stack, job.tenant_id)) as c:
        api_job = c.get(f"/v1/jobs/{job_id}").json()
    assert {k: v for k, v in api_job["counts"].items() if v} == counts, api_job
    assert api_job["status"] == status
    # One output per succeeded item, its object present and its bytes matching the sha256.
    succeeded = [it for it in items if it.status == "succeeded"]
    assert all(len(outputs.get(it.id, [])) == 1 for it in succeeded)
    assert not [it.id for it in items if it.status != "succeeded" and outputs.get(it.id)]
    for it in succeeded:
        (out,) = outputs[it.id]
        if out.storage_key:
            try:
                data = stack.store.get(out.storage_key)
            except InputMissing:
                pytest.fail(f"item {it.index}: output object {out.storage_key} is missing")
        else:
            data = (out.text or "").encode()
        assert hashlib.sha256(data).hexdigest() == out.sha256, f"item {it.index}: sha256"
    return counts


def _tenant_of(stack: Stack, tenant_id: str) -> str:
    return next(name for name, tid in stack.tenant_ids.items() if tid == tenant_id)
