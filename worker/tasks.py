"""Thin Celery tasks: a chunk message -> the process's Engine -> ack.

Per worker process (after the fork, in ``worker_process_init``): one database engine, one store,
one Engine with its model loaded, and one reconciler thread. ``run_chunk`` retries with backoff
when infrastructure (database, store, broker) is down; item-level problems never reach it.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

from celery.signals import worker_init, worker_process_init, worker_process_shutdown

from loom.config import Settings
from loom.errors import InfrastructureError, ServiceUnavailable, StorageError
from worker.app import app, make_publisher

if TYPE_CHECKING:  # pragma: no cover
    from worker.engine import Engine
    from worker.reconciler import Reconciler
    from worker.sizing import HostShare

log = logging.getLogger(__name__)

RETRY_BACKOFF_MAX_SECONDS = 60
MAX_RETRIES = 10


class _Process:
    """What one worker process holds; built lazily (solo pool) or in worker_process_init."""

    lock = threading.Lock()
    settings: Settings | None = None
    db_engine: Any = None
    engine: Engine | None = None
    reconciler: Reconciler | None = None
    share: HostShare | None = None  # this process's slot among the host's model processes
    decode_on_model_thread = False  # set by size_process (worker.sizing.decodes_on_model_thread)
    pid: int | None = None  # the process that built the above (a fork must not inherit them)


def worker_id(node: str | None = None) -> str:
    """``node:pid:random`` (node = the Celery node name, e.g. ``w1@host``, else the hostname).

    The random suffix: a restarted process that reuses a pid never inherits the leases (and so
    the right to complete items) of the dead one."""
    node = node.replace(":", "_") if node else socket.gethostname()
    return f"{node}:{os.getpid()}:{secrets.token_hex(3)}"


def get_settings() -> Settings:
    return getattr(app, "loom_settings", None) or Settings()


def get_engine(node: str | None = None) -> Engine:
    """The per-process Engine (created on first use, after the fork)."""
    if _Process.engine is not None and _Process.pid == os.getpid():
        return _Process.engine
    with _Process.lock:
        if _Process.pid != os.getpid():
            # Built before a fork (never on purpose): leave the parent's pool and threads alone.
            _Process.engine = _Process.db_engine = _Process.reconciler = None
        if _Process.engine is None:
            from loom.db import WORKER_PING_IDLE_SECONDS, make_engine, make_session_factory
            from loom.storage import store_from_settings
            from worker.engine import Engine

            settings = get_settings()
            _Process.settings = settings
            _Process.db_engine = make_engine(settings.database_url,
                                             ping_idle_seconds=WORKER_PING_IDLE_SECONDS)
            _Process.engine = Engine(
                settings,
                session_factory=make_session_factory(_Process.db_engine),
                store=store_from_settings(settings),
                worker_id=worker_id(node),
                decode_on_model_thread=_Process.decode_on_model_thread,
            )
            _Process.pid = os.getpid()
        return _Process.engine


def start_reconciler() -> Reconciler:
    from worker.reconciler import Reconciler

    engine = get_engine()
    if _Process.reconciler is None:
        _Process.reconciler = Reconciler(
            session_factory=engine.session_factory,
            publish=make_publisher(app),
            interval_seconds=engine.settings.reconcile_interval_seconds,
            stale_after_seconds=engine.settings.stale_chunk_seconds,
            store=engine.store,
            sweep_interval_seconds=engine.settings.orphan_sweep_interval_seconds,
            orphan_grace_seconds=engine.settings.orphan_grace_seconds,
        )
    _Process.reconciler.start()
    return _Process.reconciler


def size_process(settings: Settings) -> HostShare:
    """Take this process's host slot and size torch before the model loads (worker.sizing):
    threads = usable cores / model processes on the host, unless LOOM_TORCH_THREADS says; on
    CUDA the process with slot k uses GPU k."""
    from worker import sizing

    p = sizing.plan(device=settings.device, processes=settings.worker_processes,
                    threads=settings.torch_threads)
    fixed = settings.torch_threads or (p.threads if p.device == "cuda" else None)
    # On CPU, at most cores // threads processes run a chunk at once (worker.sizing).
    tokens = (max(1, p.cores // (fixed or 1))
              if p.device != "cuda" and settings.host_run_tokens else None)
    share = sizing.HostShare(cores=p.cores, planned=p.processes, fixed_threads=fixed,
                             run_tokens=tokens)
    threads = share.start()
    if p.device == "cuda" and p.gpus > 0:
        import torch

        torch.cuda.set_device((share.slot or 0) % p.gpus)
    _Process.decode_on_model_thread = sizing.decodes_on_model_thread(
        p.device, processes=p.processes, threads=threads, cores=p.cores)
    log.info("loom worker process %d: slot %s, %d torch thread(s), %s; allocator %s; inputs "
             "decoded %s", os.getpid(), share.slot, threads, p.describe(),
             "tuned" if share.allocator_tuned else "as configured",
             "on the model thread" if _Process.decode_on_model_thread else "beside the model")
    _Process.share = share
    return share


def shutdown_process() -> None:
    if _Process.reconciler is not None:
        _Process.reconciler.stop()
        _Process.reconciler = None
    if _Process.engine is not None:
        _Process.engine.close()
        _Process.engine = None
    if _Process.db_engine is not None:
        _Process.db_engine.dispose()
        _Process.db_engine = None
    if _Process.share is not None:
        _Process.share.release()
        _Process.share = None


@worker_init.connect
def _on_worker_init(**_: Any) -> None:
    """In the worker's main process, before the pool forks: configure the ORM mappers once
    (the first query of every model process did it, 0.1 s of CPU each, after its fork)."""
    from sqlalchemy.orm import configure_mappers

    import loom.models  # noqa: F401 - the mapped classes

    configure_mappers()


@worker_process_init.connect
def _on_process_init(sender: Any = None, **_: Any) -> None:
    """After the fork (prefork and solo pools both send it): connect, load the default model,
    start reconciling."""
    try:
        size_process(get_settings())
    except Exception:  # sizing is an optimisation: never keep the worker from starting
        log.exception("could not size this worker process to the host")
    engine = get_engine(sender if isinstance(sender, str) else None)
    try:
        engine.model(engine.settings.default_model)
    except Exception:  # an unknown/broken default model fails its items, not the worker
        log.exception("could not preload model %r", engine.settings.default_model)
    start_reconciler()
    log.info("loom worker process ready: %s", engine.worker_id)


@worker_process_shutdown.connect
def _on_process_shutdown(**_: Any) -> None:
    shutdown_process()


def _infrastructure_errors() -> tuple[type[BaseException], ...]:
    from kombu.exceptions import OperationalError as KombuOperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from sqlalchemy.exc import InterfaceError
    from sqlalchemy.exc import OperationalError as DBOperationalError

    return (
        DBOperationalError,
        InterfaceError,
        StorageError,
        InfrastructureError,
        ServiceUnavailable,
        KombuOperationalError,
        RedisConnectionError,
        RedisTimeoutError,
        ConnectionError,
        TimeoutError,
    )


@app.task(
    name="loom.run_chunk",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    max_retries=MAX_RETRIES,
)
def run_chunk(self: Any, job_id: str, start: int, end: int) -> dict[str, Any]:
    """Run items [start, end) of ``job_id``; safe to deliver twice (claims are fenced)."""
    from loom.jobs import Chunk

    share = _Process.share
    if share is not None and share.pid != os.getpid():
        share = None  # taken before a fork (never on purpose): not this process's
    if share is not None:
        share.rebalance()  # another invocation started or stopped on this host
    try:
        with share.running() if share is not None else nullcontext():
            report = get_engine().run_chunk(Chunk(job_id, int(start), int(end)))
    except _infrastructure_errors() as exc:
        countdown = min(RETRY_BACKOFF_MAX_SECONDS, 2 ** self.request.retries)
        log.warning("chunk %s[%s:%s] hit %r; retrying in %ss", job_id, start, end, exc, countdown)
        # The reconciler is the backstop if retries run out: the items stay in the database.
        raise self.retry(exc=exc, countdown=countdown) from exc
    log.info(
        "chunk %s[%s:%s]: claimed=%d (lingered=%d filled=%d) succeeded=%d failed=%d "
        "retried=%d in %.2fs", job_id, start, end, report.claimed, report.lingered,
        report.filled, report.succeeded, report.failed, report.retried, report.seconds,
    )
    # What Flower shows as the task's result: the chunk's items, and "all_failed" when every item
    # it finished failed. The task itself still succeeds: the items' failures are recorded on
    # their rows, and raising (Reject/failure state) would only make Celery redeliver or log a
    # chunk whose work is done; ignore_result keeps this out of the result backend.
    return chunk_summary(report)


def chunk_summary(report: Any) -> dict[str, Any]:
    finished = report.succeeded + report.failed + report.cancelled
    state = "empty" if not report.claimed else (
        "all_failed" if report.failed and report.failed == finished and not report.retried
        else "some_failed" if report.failed else "ok")
    return {"state": state, "claimed": report.claimed, "succeeded": report.succeeded,
            "failed": report.failed, "retried": report.retried, "cancelled": report.cancelled,
            "fenced": report.fenced, "cached": getattr(report, "cached", 0),
            # Claimed beyond the chunk: from the rest of its job, and from other jobs.
            "lingered": getattr(report, "lingered", 0), "filled": getattr(report, "filled", 0),
            "seconds": round(report.seconds, 3)}
