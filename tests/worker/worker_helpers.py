"""Worker test helpers: input images (good and hostile), job submission, and real Celery worker
processes started the way burst workers are (a subprocess per worker, torn down afterwards).

A plain module (not conftest) so that test modules can import it: tests/worker is on sys.path."""

from __future__ import annotations

import io
import os
import secrets
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
MODEL = "loom-shapes"

# --- images ---------------------------------------------------------------------------------------

COLOURS = [(220, 30, 30), (30, 170, 60), (40, 70, 220), (235, 205, 30), (150, 50, 180)]


def shape_png(i: int, size: int = 64) -> bytes:
    """A small scene: one coloured square or circle on a light background."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), (240, 240, 235))
    draw = ImageDraw.Draw(im)
    colour = COLOURS[i % len(COLOURS)]
    x0 = 8 + (i * 7) % 24
    box = (x0, 16, x0 + 24, 40)
    (draw.ellipse if i % 2 else draw.rectangle)(box, fill=colour)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def magenta_png() -> bytes:
    """The poison marker for tests/worker/poison_worker.py: a pure magenta 7x7 image."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (7, 7), (255, 0, 255)).save(buf, format="PNG")
    return buf.getvalue()


def truncated_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.effect_noise((128, 128), 64).convert("RGB").save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    return data[: len(data) // 2]


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(side: int = 30_000) -> bytes:
    """A real decompression bomb: a valid 1-bit side x side PNG of zeros (~110 KB on disk,
    ~900 M pixels once decoded)."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    parts = []
    rows_per_block = max(1, (1 << 20) // len(row))
    block = row * rows_per_block
    left = side
    while left > 0:
        n = min(rows_per_block, left)
        parts.append(comp.compress(block if n == rows_per_block else row * n))
        left -= n
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


# --- a fake model for fast in-process engine tests ---------------------------------------------


@dataclass(frozen=True)
class FakeInfo:
    name: str = "fake"
    version: str = "0.0.1"
    weights_sha256: str = "f" * 64
    tasks: tuple[str, ...] = ("caption", "vqa", "generate")


@dataclass
class FakeModel:
    info: FakeInfo = field(default_factory=FakeInfo)
    calls: list[tuple[str, int]] = field(default_factory=list)
    fail_on: Callable[[Any], bool] | None = None  # an image that makes the whole call raise

    def _check(self, images: list[Any]) -> None:
        if self.fail_on is not None and any(self.fail_on(im) for im in images):
            raise RuntimeError("device fell over")

    def caption(self, images: list[Any]) -> list[str]:
        self.calls.append(("caption", len(images)))
        self._check(images)
        return [f"a {im.size[0]}x{im.size[1]} picture" for im in images]

    def answer(self, images: list[Any], questions: list[str]) -> list[str]:
        self.calls.append(("vqa", len(images)))
        self._check(images)
        return [f"yes: {q}" for q in questions]

    def generate(self, prompts: list[str], seeds: list[int]) -> list[Any]:
        from PIL import Image

        self.calls.append(("generate", len(prompts)))
        return [Image.new("RGB", (16, 16), (s % 256, len(p) % 256, 7))
                for p, s in zip(prompts, seeds, strict=True)]


# --- jobs -----------------------------------------------------------------------------------------


def tenant_id(session_factory: Any, name: str = "local") -> str:
    from loom.tenants import ensure_tenant

    with session_factory() as s:
        return ensure_tenant(s, name=name).id


def upload_inputs(store: Any, tenant: str, blobs: list[bytes], ext: str = "png") -> list[str]:
    """Store input bytes under server-style keys (as the API does before submitting)."""
    from concurrent.futures import ThreadPoolExecutor

    from loom.storage import input_key

    upload_id = secrets.token_hex(8)
    keys = [input_key(tenant, upload_id, i, ext) for i in range(len(blobs))]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kb: store.put(kb[0], kb[1], "application/octet-stream"),
                      zip(keys, blobs, strict=True)))
    return keys


def submit(
    session_factory: Any,
    *,
    task: str,
    inputs: list[dict[str, Any]],
    chunk_size: int,
    max_attempts: int = 3,
    model: str = MODEL,
    publish: Callable[[Any], None] | None = None,
    tenant: str | None = None,
    metadata: list[dict[str, Any] | None] | None = None,
) -> str:
    from loom import jobs

    tenant = tenant or tenant_id(session_factory)
    items = [
        {"input": inp, "metadata": (metadata[i] if metadata else None)}
        for i, inp in enumerate(inputs)
    ]
    with session_factory() as s:
        job = jobs.submit_job(
            s, tenant_id=tenant, task=task, model_name=model, items=items,
            chunk_size=chunk_size, max_attempts=max_attempts,
        )
        if publish is not None:
            jobs.publish_pending(s, publish=publish, job_id=job.id)
        return job.id


def job_status(session_factory: Any, job_id: str) -> str:
    from sqlalchemy import select

    from loom.models import Job

    with session_factory() as s:
        return str(s.scalar(select(Job.status).where(Job.id == job_id)))


def item_counts(session_factory: Any, job_id: str) -> dict[str, int]:
    from sqlalchemy import func, select

    from loom.models import Item

    with session_factory() as s:
        return dict(
            s.execute(
                select(Item.status, func.count()).where(Item.job_id == job_id).group_by(Item.status)
            ).all()
        )


TERMINAL = {"succeeded", "completed_with_errors", "failed", "cancelled"}


def wait_for_job(
    session_factory: Any, job_id: str, *, timeout: float, pool: WorkerPool | None = None
) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = job_status(session_factory, job_id)
        if status in TERMINAL:
            return status
        if time.monotonic() > deadline:
            logs = pool.logs() if pool is not None else ""
            pytest.fail(
                f"job {job_id} still {status} after {timeout}s: "
                f"{item_counts(session_factory, job_id)}\n{logs}"
            )
        time.sleep(0.25)


# --- real worker processes ----------------------------------------------------------------------


@dataclass
class WorkerProc:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pgid(self) -> int:
        return self.proc.pid  # started with start_new_session=True: its own process group

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and its pool child), like a lost machine."""
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


class WorkerPool:
    """Starts ``celery -A <app> worker`` subprocesses; ``stop()`` always reaps them."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.workers: list[WorkerProc] = []

    def start(
        self, name: str, *, app: str = "worker.app", extra_env: dict[str, str] | None = None
    ) -> WorkerProc:
        env = {**self.env, **(extra_env or {})}
        log_path = self.log_dir / f"{name}.log"
        log = open(log_path, "wb")  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(
                [
                    sys.executable, "-m", "celery", "-A", app, "worker",
                    "-Q", "loom", "-c", "1", "--pool", "prefork", "-n", f"{name}@%h",
                    "--without-heartbeat", "--without-mingle", "--without-gossip",
                    "--loglevel", "INFO",
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        worker = WorkerProc(name, proc, log_path)
        self.workers.append(worker)
        return worker

    def logs(self, tail: int = 4000) -> str:
        out = []
        for w in self.workers:
            text = w.log_path.read_text(errors="replace") if w.log_path.exists() else ""
            out.append(f"--- {w.name} (alive={w.alive()}) ---\n{text[-tail:]}")
        return "\n".join(out)

    def stop(self) -> None:
        for w in self.workers:
            if w.alive():
                try:
                    os.killpg(w.pgid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        for w in self.workers:
            try:
                w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            # Whatever is left of the group (a pool child that outlived its parent): SIGKILL.
            try:
                os.killpg(w.pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if w.proc.poll() is None:
                w.proc.wait(timeout=15)


def worker_env(
    *, database_url: str, broker_url: str, storage_url: str, s3_endpoint: str | None,
    home: Path, **overrides: Any,
) -> dict[str, str]:
    values: dict[str, Any] = {
        "LOOM_HOME": str(home),
        "LOOM_DATABASE_URL": database_url,
        "LOOM_BROKER_URL": broker_url,
        "LOOM_STORAGE_URL": storage_url,
        "LOOM_DEVICE": "cpu",
        "LOOM_AUTH": "off",
        "LOOM_BATCH_SIZE": 8,
        "LOOM_CHUNK_BATCHES": 4,
        "LOOM_LEASE_SECONDS": 3,
        "LOOM_HEARTBEAT_SECONDS": 0.5,
        "LOOM_RECONCILE_INTERVAL_SECONDS": 1,
        "LOOM_STALE_CHUNK_SECONDS": 5,
        "LOOM_RETRY_BACKOFF_SECONDS": 0.2,
        "LOOM_VISIBILITY_TIMEOUT_SECONDS": 600,
        "LOOM_TASK_TIME_LIMIT_SECONDS": 300,
    }
    if s3_endpoint:
        values["LOOM_S3_ENDPOINT_URL"] = s3_endpoint
    values.update({f"LOOM_{k.upper()}": v for k, v in overrides.items()})
    keep = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    return {
        **keep,
        **{k: str(v) for k, v in values.items()},
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]),
    }




def submit_finetune(session_factory: Any, store: Any, *, rows: list[Any], name: str,
                    hyper: dict[str, Any], base: str = MODEL, tenant: str | None = None,
                    val_fraction: float = 0.25, publish: Callable[[Any], None] | None = None,
                    max_attempts: int = 3) -> str:
    """A finetune job as `loom finetune` records it: each row's image under the job's input
    keys, the rows manifest beside them, one item naming both."""
    import hashlib
    import io
    import json

    from loom import jobs, storage
    from loom.models import new_id

    tenant = tenant or tenant_id(session_factory)
    job_id = new_id()
    lines = []
    for i, r in enumerate(rows):
        buf = io.BytesIO()
        r.image.save(buf, format="PNG")
        key = storage.input_key(tenant, job_id, i, "png")
        store.put(key, buf.getvalue(), "image/png")
        lines.append(json.dumps({"image_key": key, "caption": r.caption,
                                 "question": r.question, "answer": r.answer}))
    data = ("\n".join(lines) + "\n").encode()
    rows_key = storage.training_key(tenant, job_id, "rows.jsonl")
    store.put(rows_key, data, "application/x-ndjson")
    item = {"rows_key": rows_key, "rows_sha256": hashlib.sha256(data).hexdigest(),
            "rows": len(rows), "name": name, "base": base, "hyper": hyper,
            "val_fraction": val_fraction}
    with session_factory() as s:
        job = jobs.submit_job(s, job_id=job_id, tenant_id=tenant, task="finetune",
                              model_name=base, items=[{"input": item}], chunk_size=1,
                              max_attempts=max_attempts, use_cache=False)
        if publish is not None:
            jobs.publish_pending(s, publish=publish, job_id=job.id)
        return job.id


def make_engine_(embedded: Any, model: Any, worker_id: str = "w-test", **kwargs: Any) -> Any:
    """An Engine on the ``embedded`` fixture's (settings, session factory, store), serving
    ``model`` under every name."""
    from worker.engine import Engine

    settings, sf, store = embedded
    return Engine(settings, session_factory=sf, store=store, worker_id=worker_id,
                  model_loader=lambda name: model, **kwargs)


def items_of(sf: Any, job_id: str) -> list[Any]:
    from sqlalchemy import select

    from loom.models import Item

    with sf() as s:
        return list(s.scalars(select(Item).where(Item.job_id == job_id).order_by(Item.index)))


def outputs_of(sf: Any, job_id: str) -> list[Any]:
    from sqlalchemy import select

    from loom.models import Output

    with sf() as s:
        return list(s.scalars(select(Output).where(Output.job_id == job_id)))


def expire_leases(session: Any, item_ids: list[int]) -> None:
    """As if the worker holding these items had died a moment ago: their leases and the lease
    rows naming them expired (the two expire together: claims and heartbeats set both)."""
    from datetime import timedelta

    from sqlalchemy import update

    from loom.models import Item, Lease, utcnow

    past = utcnow() - timedelta(seconds=1)
    session.execute(update(Item).where(Item.id.in_(item_ids)).values(lease_expires_at=past))
    rows = [r.id for r in session.query(Lease) if set(r.item_ids) & set(item_ids)]
    session.execute(update(Lease).where(Lease.id.in_(rows)).values(expires_at=past))
    session.commit()
