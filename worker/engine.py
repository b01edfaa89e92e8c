"""The batching engine: claim -> read/decode -> model -> upload -> fenced complete.

One Engine per worker process (or per embedded CLI run). ``run_chunk`` drains one chunk
[start, end) of a job: it claims ``claim_batches`` batches of up to ``batch_size`` items at a time
(one statement) under a lease, heartbeats the leases from a background thread, and overlaps the
three stages: while the model runs batch N on
the calling thread, batch N+1 is claimed and its inputs are read and decoded in an I/O thread pool,
and batch N-1's outputs are uploaded and completed by a finisher thread.

Poison inputs: an item whose previous attempt died with its worker (claimable with an attempt
spent) is claimed and run ALONE, with nothing else in flight, so an input that kills the process
burns only its own attempts; the attempt cap then ends it ``failed`` (worker_lost) via the
reconciler.

Outages are no item's fault: a store read or write that fails because the store is down
(``StoreUnavailable``) gives the item's lease back without spending its attempt
(``jobs.release_items``), and the engine claims nothing until the store answers a probe again (the
same write ``/readyz`` makes), backing off meanwhile. A database error ends ``run_chunk``: the
engine waits until the database answers, gives back the leases it still holds, and raises, so the
task retries the chunk.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from loom import jobs, tasks
from loom.config import Settings
from loom.models import Job, JobStatus, utcnow
from worker.batches import Batch, ChunkReport, JobFacts, Progress, Scope, StageParts
from worker.cache import ResultCache
from worker.claiming import Claimer
from worker.finishing import Finisher
from worker.handlers import HANDLERS, HandlerContext
from worker.inference import ModelCache, ModelLoader
from worker.leases import LeaseKeeper
from worker.outages import (
    OUTAGE_BACKOFF_MAX_SECONDS,
    OUTAGE_BACKOFF_MIN_SECONDS,
    OutageGuard,
    is_outage,
)
from worker.runner import Runner
from worker.webhook_sender import WebhookSender

if TYPE_CHECKING:  # pragma: no cover
    from loom.jobs import Chunk
    from loom.storage import Store

log = logging.getLogger(__name__)

__all__ = ["OUTAGE_BACKOFF_MAX_SECONDS", "OUTAGE_BACKOFF_MIN_SECONDS", "ChunkReport", "Engine",
           "Progress", "is_outage"]


class Engine:
    def __init__(
        self,
        settings: Settings,
        *,
        session_factory: sessionmaker[Session],
        store: Store,
        worker_id: str,
        model_loader: ModelLoader | None = None,
        io_threads: int = 4,
        should_stop: Callable[[], bool] | None = None,
        decode_on_model_thread: bool = False,
    ) -> None:
        self.settings = settings
        # Polled between batches: a clean stop (Ctrl-C on an embedded run) finishes the batch in
        # flight, gives the leases of claimed-but-unrun items back, and returns.
        self.should_stop = should_stop or (lambda: False)
        self.session_factory = session_factory
        self.store = store
        self.worker_id = worker_id
        self.models = ModelCache(
            settings, session_factory=session_factory, model_loader=model_loader, store=store
        )
        self.stages_ms: dict[str, float] = {}  # this process's summed stage times (all chunks)
        self.items_done = 0
        self._stages_lock = threading.Lock()
        self.leases = LeaseKeeper(
            session_factory=session_factory,
            worker_id=worker_id,
            lease_seconds=settings.lease_seconds,
            interval_seconds=min(settings.heartbeat_seconds, settings.lease_seconds / 3.0),
        )
        self._io = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="loom-io")
        self._claim_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loom-claim")
        parts = StageParts(settings=settings, session_factory=session_factory, store=store,
                           worker_id=worker_id, leases=self.leases,
                           facts=JobFacts(session_factory), io=self._io)
        self.webhooks = WebhookSender(session_factory)
        self.outages = OutageGuard(session_factory=session_factory, store=store,
                                   worker_id=worker_id, leases=self.leases)
        self.claimer = Claimer(parts, outages=self.outages,
                               decode_on_model_thread=decode_on_model_thread)
        self.runner = Runner(settings, store=store, models=self.models,
                             cache=ResultCache(session_factory, self.models))
        self.finisher = Finisher(parts, outages=self.outages, webhooks=self.webhooks)
        ctx = HandlerContext(parts=parts, models=self.models, webhooks=self.webhooks,
                             should_stop=self.should_stop)
        self.handlers = {name: make(ctx) for name, make in HANDLERS.items()}

    def model(self, name: str) -> Any:
        """The model called ``name``, loaded once per process; raises a LoomError for items."""
        return self.models.get(name)

    # --- the loop ----------------------------------------------------------------------------

    def _job_status(self, job_id: str) -> str | None:
        with self.session_factory() as session:
            return jobs.job_status(session, job_id=job_id)

    def _run_batches(
        self,
        chunk: Chunk,
        report: ChunkReport,
        progress: Progress | None,
        pending: deque[Future[None]],
        queue: deque[Batch],
    ) -> None:
        """The loop of ``run_chunk``: claim, prepare, infer, hand to the finisher, repeat."""

        def drain(keep: int = 0) -> None:
            while len(pending) > keep:
                pending.popleft().result()  # re-raises a finisher failure (DB down, ...)

        scope = Scope(chunk, time.monotonic() + self.settings.chunk_linger_seconds)
        queue.extend(self.claimer.claim(scope, report))
        while queue:
            if len(queue) > 1 or not queue[0].urgent:
                # Claimed batches wait their turn; a fast-lane job waiting now goes before them.
                queue.extendleft(reversed(self.claimer.claim_urgent(scope, report)))
            batch = queue.popleft()
            spec = tasks.get(batch.items[0].task)
            if not spec.batched:
                drain()
                self.handlers[spec.handler].run(batch, scope, report, progress)
            else:
                if batch.careful:
                    drain()  # nothing else in flight while a possible poison runs
                prepared = self.runner.prepared(batch)
                next_claim: Future[list[Batch]] | None = None
                if not batch.careful and not queue:
                    # Overlap: claim + read (+ decode) the next batch beside the model.
                    next_claim = self._claim_thread.submit(
                        self.claimer.claim, scope, report, prefetch=True)
                try:
                    out = self.runner.run(prepared, settle=drain, job_id=chunk.job_id)
                finally:
                    if next_claim is not None:
                        claimed = next_claim.result()
                        # The fast lane's batch goes ahead of those claimed before it.
                        if claimed and claimed[0].urgent:
                            queue.extendleft(reversed(claimed))
                        else:
                            queue.extend(claimed)
                pending.append(self.finisher.submit(batch, out, report, progress))
                drain(keep=0 if batch.careful else 1)
                if queue and queue[0].careful:
                    drain()
            # Between batches: a cancel request (seen by the last claim) stops the chunk.
            if scope.cancelling:
                drain()
                with self.session_factory() as session:
                    report.cancelled += jobs.cancel_remaining(
                        session,
                        job_id=chunk.job_id,
                        worker_id=self.worker_id,
                        store=self.store,
                        on_finalized=self.webhooks.finalized,
                    )
                queue.clear()
                break
            if self.should_stop():
                drain()
                break
            if not queue:
                drain()
                queue.extend(self.claimer.claim(scope, report))
        drain()
        if queue and self.should_stop():
            self.claimer.release(queue)
            queue.clear()

    def run_chunk(self, chunk: Chunk, progress: Progress | None = None) -> ChunkReport:
        """Process every claimable item of ``chunk``; returns what this worker did with them.

        Safe to run twice at once for the same chunk (claims and completion are fenced in the
        database). Raises on infrastructure failures (database/store down): the caller retries.
        """
        report = ChunkReport(job_id=chunk.job_id, start=chunk.start, end=chunk.end)
        t_start = time.perf_counter()
        pending: deque[Future[None]] = deque()
        queue: deque[Batch] = deque()
        try:
            with self.leases.heartbeating():
                try:
                    self._run_batches(chunk, report, progress, pending, queue)
                except Exception as exc:
                    if not is_outage(exc):
                        raise
                    # Let the batches in flight settle, then give back what is still held.
                    while pending:
                        try:
                            pending.popleft().result()
                        except Exception:
                            log.exception("finishing a batch failed during an outage")
                    self.outages.give_back_held(exc)
                    raise
        finally:
            # On an error, let in-flight work settle before the leases stop being extended.
            for fut in pending:
                try:
                    fut.result()
                except Exception:
                    log.exception("finishing a batch failed")
            try:  # the run is over: what it drained is finalised now (on the finisher thread)
                self.finisher.finalize_now()
            except Exception:
                log.exception("finalising drained jobs failed (the reconciler will)")
            for batch in queue:
                for fut in batch.prepared:
                    fut.cancel()
            report.seconds = time.perf_counter() - t_start
            self._record_stages(report)
        return report

    def run_job(
        self, job_id: str, progress: Progress | None = None, *, poll_seconds: float = 0.5
    ) -> Job:
        """Embedded mode: run every chunk of ``job_id`` in this process until the job is final.

        Marks the job's outbox rows published (no broker is involved) and loops over its chunks
        until the job reaches a terminal status (items retried after a transient error wait for
        their backoff).
        """
        from loom.models import JOB_TERMINAL

        terminal = {s.value for s in JOB_TERMINAL}
        with self.session_factory() as session:
            jobs.publish_pending(session, publish=lambda _chunk: None, job_id=job_id)
            chunks = jobs.job_chunks(session, job_id=job_id)
        # One range over the whole job: no pipeline drain at every chunk boundary (the broker's
        # chunks exist to spread work over workers; here every engine claims from all of it).
        if chunks:
            chunks = [jobs.Chunk(job_id, min(c.start for c in chunks),
                                 max(c.end for c in chunks), max(c.priority for c in chunks))]
        # Idle polls start short: the usual wait is for another process's last batch, and the
        # job's end was noticed up to a whole poll late.
        wait = min(0.05, poll_seconds)
        while not self.should_stop():
            claimed = 0
            for chunk in chunks:
                claimed += self.run_chunk(chunk, progress=progress).claimed
            if claimed:
                wait = min(0.05, poll_seconds)
            if self.should_stop():
                break
            status = self._job_status(job_id)
            if status is None or status in terminal:
                break
            if claimed == 0:
                with self.session_factory() as session:
                    # No reconciler runs in embedded mode: expired leases (a crashed earlier run)
                    # at the attempt cap end failed here, the others become claimable again.
                    jobs.free_expired_leases(session, now=utcnow())
                    jobs.maybe_finalize(session, job_id=job_id, store=self.store,
                                        on_finalized=self.webhooks.finalized)
                    if self._job_status(job_id) == JobStatus.finalizing.value:
                        # The manifest write failed (store down): finish it, as the reconciler
                        # does in distributed mode; until the store is back, poll.
                        jobs.complete_finalization(session, job_id=job_id, store=self.store,
                                                   on_finalized=self.webhooks.finalized)
                status = self._job_status(job_id)
                if status is None or status in terminal:
                    break
                time.sleep(wait)  # backoff of retried items, or leases held elsewhere
                wait = min(wait * 2, poll_seconds)
        with self.session_factory() as session:
            return jobs.get_job(session, job_id=job_id)

    def _record_stages(self, report: ChunkReport) -> None:
        """Add a chunk's stage times to the process totals; with LOOM_STAGE_LOG set, write them
        to ``{stage_log}/{worker_id}.json`` (what bench/eta.py reads for its breakdown)."""
        with self._stages_lock:
            for k, v in report.timings_ms.items():
                self.stages_ms[k] = self.stages_ms.get(k, 0.0) + v
            self.items_done += report.succeeded + report.failed
            snapshot = {"worker_id": self.worker_id, "items": self.items_done,
                        "stages_ms": dict(self.stages_ms)}
        if self.settings.stage_log is not None:
            import json
            import os

            path = Path(self.settings.stage_log)
            path.mkdir(parents=True, exist_ok=True)
            name = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.worker_id)
            tmp = path / f".{name}.tmp"
            tmp.write_text(json.dumps(snapshot))
            os.replace(tmp, path / f"{name}.json")

    def close(self) -> None:
        self._claim_thread.shutdown(wait=True, cancel_futures=True)
        self._io.shutdown(wait=True, cancel_futures=True)
        self.finisher.close()
        self.webhooks.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

