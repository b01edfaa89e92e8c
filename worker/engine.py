"""The batching engine: claim -> read/decode -> model -> upload -> fenced complete.

One Engine per worker process (or per embedded CLI run). ``run_chunk`` drains one chunk
[start, end) of a job: it claims up to ``batch_size`` items at a time under a lease, heartbeats the
leases from a background thread, and overlaps the three stages: while the model runs batch N on
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import InterfaceError
from sqlalchemy.exc import OperationalError as DBOperationalError
from sqlalchemy.orm import Session, sessionmaker

from loom import jobs, tasks
from loom.config import Settings
from loom.errors import InfrastructureError, LoomError, ModelError
from loom.models import Job, JobStatus, utcnow
from worker.cache import ResultCache
from worker.inference import ModelCache, ModelLoader, infer
from worker.inputs import Prepared, prepare
from worker.leases import LeaseKeeper
from worker.outputs import store_output

if TYPE_CHECKING:  # pragma: no cover
    from loom.jobs import Chunk, ClaimedItem, ItemFailure, ItemResult
    from loom.storage import Store

log = logging.getLogger(__name__)

Progress = Callable[[int], None]  # called with the number of items a batch finished

# Probing a dependency that is down: first retry after OUTAGE_BACKOFF_MIN s, doubling up to MAX.
OUTAGE_BACKOFF_MIN_SECONDS = 0.5
OUTAGE_BACKOFF_MAX_SECONDS = 5.0


def is_outage(exc: BaseException) -> bool:
    """A dependency is down (store or database): not a property of the items in flight."""
    from loom.storage import is_outage as store_outage

    return isinstance(exc, (InfrastructureError, DBOperationalError, InterfaceError)) or (
        store_outage(exc)
    )


@dataclass
class ChunkReport:
    job_id: str
    start: int
    end: int
    claimed: int = 0
    succeeded: int = 0
    failed: int = 0  # permanent failures recorded by this worker
    retried: int = 0  # transient failures sent back to the queue (backoff)
    fenced: int = 0  # results this worker produced but lost to a newer lease holder
    cached: int = 0  # items answered by an earlier output, with no inference
    cancelled: int = 0
    released: int = 0  # leases given back after an outage, attempts not spent
    lingered: int = 0  # items claimed beyond the chunk, from the rest of its job
    batches: int = 0
    seconds: float = 0.0
    timings_ms: dict[str, float] = field(default_factory=dict)  # summed stage times

    def add_timing(self, name: str, ms: float) -> None:
        self.timings_ms[name] = self.timings_ms.get(name, 0.0) + ms


@dataclass
class _Scope:
    """What ``run_chunk`` may claim from: its chunk, then (until ``linger_until``) the rest of
    the job. ``cancelling`` is set by whichever thread claimed last and saw the job cancelling,
    so the model thread never waits on that query."""

    chunk: Chunk
    job_end: int
    linger_until: float
    lingering: bool = False
    cancelling: bool = False


@dataclass
class _Batch:
    items: list[ClaimedItem]
    careful: bool  # run alone: a previous attempt of this item died with its worker
    prepared: list[Future[Prepared]] = field(default_factory=list)


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
    ) -> None:
        self.settings = settings
        # Polled between batches: a clean stop (Ctrl-C on an embedded run) finishes the batch in
        # flight, gives the leases of claimed-but-unrun items back, and returns.
        self.should_stop = should_stop or (lambda: False)
        self.session_factory = session_factory
        self.store = store
        self.worker_id = worker_id
        self.models = ModelCache(
            settings, session_factory=session_factory, model_loader=model_loader
        )
        self.cache = ResultCache(session_factory, self.models)
        self._io = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="loom-io")
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loom-finish")
        self._claimer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loom-claim")
        self.stages_ms: dict[str, float] = {}  # this process's summed stage times (all chunks)
        self.items_done = 0
        self.leases = LeaseKeeper(
            session_factory=session_factory,
            worker_id=worker_id,
            lease_seconds=settings.lease_seconds,
            interval_seconds=min(settings.heartbeat_seconds, settings.lease_seconds / 3.0),
        )
        self._report_lock = threading.Lock()
        self._max_attempts_cache: dict[str, int] = {}
        self._job_end_cache: dict[str, int] = {}
        # Set by the finisher when a store call failed for want of a store; claims wait on it.
        self._store_down = threading.Event()

    # --- models ------------------------------------------------------------------------------

    def model(self, name: str) -> Any:
        """The model called ``name``, loaded once per process; raises a LoomError for items."""
        return self.models.get(name)

    # --- claiming ----------------------------------------------------------------------------

    def _claim(self, scope: _Scope, report: ChunkReport, *, prefetch: bool = False) -> list[_Batch]:
        """Claim the next batch(es) from the chunk and, once it is dry, from the rest of its job
        (while ``chunk_linger_seconds`` allows); their inputs start loading at once."""
        chunk = scope.chunk
        if not scope.lingering:
            batches = self._claim_range(scope, chunk, report, prefetch=prefetch)
            if batches or scope.cancelling or not self._may_linger(scope):
                return batches
            scope.lingering = True
        if not self._may_linger(scope):
            return []
        whole = jobs.Chunk(chunk.job_id, 0, scope.job_end, chunk.priority)
        batches = self._claim_range(scope, whole, report, prefetch=prefetch)
        report.lingered += sum(1 for b in batches for i in b.items
                               if not chunk.start <= i.index < chunk.end)
        return batches

    def _may_linger(self, scope: _Scope) -> bool:
        chunk = scope.chunk
        return (scope.job_end > chunk.end - chunk.start and not scope.cancelling
                and time.monotonic() < scope.linger_until)

    def _claim_range(self, scope: _Scope, chunk: Chunk, report: ChunkReport, *,
                     prefetch: bool) -> list[_Batch]:
        """Claim from [chunk.start, chunk.end).

        ``prefetch``: claiming while another batch is in flight. A suspect is then not claimed
        (a crash of the running batch would burn one of its attempts); it waits until nothing
        else is in flight. A suspect's input is read and decoded only once it runs (alone).
        A job seen cancelling sets ``scope.cancelling`` and claims nothing."""
        if self._store_down.is_set():
            if prefetch:
                return []  # claim again once the batch in flight is done and the store is back
            self._await_store()

        def claim(start: int, end: int, limit: int) -> list[ClaimedItem]:
            t0 = time.perf_counter()
            with self.session_factory() as session:
                items = jobs.claim_items(
                    session,
                    job_id=chunk.job_id,
                    start=start,
                    end=end,
                    worker_id=self.worker_id,
                    limit=limit,
                    lease_seconds=self.settings.lease_seconds,
                )
            self.leases.add(i.id for i in items)
            with self._report_lock:
                report.add_timing("claim", (time.perf_counter() - t0) * 1000.0)
            return items

        t0 = time.perf_counter()
        with self.session_factory() as session:
            # One session for both reads: the status check costs no extra pool checkout.
            if jobs.job_status(session, job_id=chunk.job_id) == JobStatus.cancelling.value:
                scope.cancelling = True
                return []
            suspects = jobs.suspect_indexes(session, chunk=chunk,
                                            limit=self.settings.batch_size)
        with self._report_lock:
            report.add_timing("claim", (time.perf_counter() - t0) * 1000.0)
        if suspects and prefetch:
            return []
        batches: list[_Batch] = []
        for index in suspects:
            items = claim(index, index + 1, 1)
            if items:
                batches = [_Batch(items, careful=True)]
                break
        if not batches:
            items = claim(chunk.start, chunk.end, self.settings.batch_size)
            if not items:
                return []
            with self.session_factory() as session:
                suspect = jobs.suspect_ids(
                    session, item_ids=[i.id for i in items if i.attempts > 1])
            fresh = [i for i in items if i.id not in suspect]
            retried = [i for i in items if i.id in suspect]
            # Race with an expiring lease: run the others together first, then each suspect
            # alone.
            if fresh:
                batches.append(_Batch(fresh, careful=False))
            batches.extend(_Batch([i], careful=True) for i in retried)
        for batch in batches:
            report.claimed += len(batch.items)
            if not batch.careful:
                batch.prepared = [
                    self._io.submit(prepare, item, settings=self.settings, store=self.store)
                    for item in batch.items
                ]
        return batches

    # --- the finishing stage (finisher thread) -----------------------------------------------

    def _finish(
        self,
        batch: _Batch,
        outputs: list[tuple[Prepared, Any]],
        bad: list[Prepared],
        info: Any,
        infer_ms: float,
        report: ChunkReport,
        progress: Progress | None,
    ) -> None:
        n = len(outputs)
        futures: list[Future[ItemResult]] = []
        kind = tasks.get(batch.items[0].task).output
        for prep, out in outputs:
            timings = {**prep.timings, "infer_ms": infer_ms, "infer_batch_size": float(n)}
            if kind != "text":  # encoding and uploading leave the finisher thread
                futures.append(self._io.submit(
                    store_output, kind, prep, out, info, timings, store=self.store))
            else:
                done: Future[ItemResult] = Future()
                try:
                    done.set_result(store_output(kind, prep, out, info, timings,
                                                 store=self.store))
                except Exception as exc:
                    done.set_exception(exc)
                futures.append(done)
        results: list[ItemResult] = []
        # Outages (the store is down) are not the items' fault: their leases go back unspent.
        outage = [p for p in bad if isinstance(p.error, InfrastructureError)]
        failures: list[ItemFailure] = [
            jobs.ItemFailure(item_id=p.item.id, error=p.error, attempt=p.item.attempts)
            for p in bad
            if p.error is not None and not isinstance(p.error, InfrastructureError)
        ]
        for (prep, _), fut in zip(outputs, futures, strict=True):
            try:
                results.append(fut.result())
            except InfrastructureError as exc:
                prep.error = exc
                outage.append(prep)
            except LoomError as exc:
                failures.append(
                    jobs.ItemFailure(item_id=prep.item.id, error=exc, attempt=prep.item.attempts)
                )
            except Exception as exc:
                err = ModelError(f"cannot store output: {type(exc).__name__}: {exc}")
                failures.append(
                    jobs.ItemFailure(item_id=prep.item.id, error=err, attempt=prep.item.attempts)
                )
        won = 0
        attempts = {i.id: i.attempts for i in batch.items}
        cap = self._max_attempts(batch.items[0].job_id)
        permanent = sum(
            1 for f in failures if not f.error.transient or attempts.get(f.item_id, cap) >= cap
        )
        t_complete = time.perf_counter()
        released = 0
        if outage:
            # Before the release: a claim racing it must wait for the store, not spin.
            self._store_down.set()
        with self.session_factory() as session:
            if outage:
                reason = str(outage[0].error)
                log.warning("store unavailable; giving back %d leases: %s", len(outage), reason)
                released = jobs.release_items(
                    session,
                    worker_id=self.worker_id,
                    leases=[(p.item.id, p.item.attempts) for p in outage],
                    reason=reason,
                )
            if results:
                won = jobs.complete_items(
                    session, worker_id=self.worker_id, results=results, store=self.store
                )
            if failures:
                jobs.fail_items(
                    session,
                    worker_id=self.worker_id,
                    failures=failures,
                    backoff_seconds=self.settings.retry_backoff_seconds,
                    store=self.store,
                )
        complete_ms = (time.perf_counter() - t_complete) * 1000.0
        self.leases.discard(i.id for i in batch.items)
        with self._report_lock:
            report.add_timing("complete", complete_ms)
            report.batches += 1
            report.succeeded += won
            report.cached += sum(1 for r in results if r.cached_from is not None)
            report.fenced += len(results) - won
            report.failed += permanent
            report.retried += len(failures) - permanent
            report.released += released
            report.add_timing("infer", infer_ms)
            for prep in [p for p, _ in outputs] + bad:
                for name in ("fetch_ms", "decode_ms"):
                    report.add_timing(name[:-3], prep.timings.get(name, 0.0))
            for r in results:
                report.add_timing("encode", r.timings.get("encode_ms", 0.0))
                report.add_timing("upload", r.timings.get("upload_ms", 0.0))
        if progress is not None:
            progress(len(batch.items))

    # --- outages ------------------------------------------------------------------------------

    def _await(self, what: str, probe: Callable[[], object]) -> None:
        """Call ``probe`` until it succeeds, backing off between tries (no attempt is spent
        meanwhile: the leases of the items in flight were given back or are heartbeated)."""
        delay, waited = OUTAGE_BACKOFF_MIN_SECONDS, 0.0
        while True:
            try:
                probe()
            except Exception as exc:  # any failure of the probe means "still down"
                log.warning("%s unavailable (%s); probing again in %.1fs", what, exc, delay)
                time.sleep(delay)
                waited += delay
                delay = min(delay * 2, OUTAGE_BACKOFF_MAX_SECONDS)
                continue
            if waited:
                log.warning("%s is back after %.1fs", what, waited)
            return

    def _await_store(self) -> None:
        from loom.storage import probe

        self._await("object store", lambda: probe(self.store))
        self._store_down.clear()

    def _await_database(self) -> None:
        def ping() -> None:
            with self.session_factory() as session:
                jobs.ping(session)

        self._await("database", ping)

    def _give_back_held(self, exc: BaseException) -> None:
        """After an outage ended the chunk: once the database answers, the leases this worker
        still holds go back to the queue with their attempts excused (not spent)."""
        self._await_database()
        held = self.leases.held()
        if held:
            with self.session_factory() as session:
                n = jobs.release_items(
                    session,
                    worker_id=self.worker_id,
                    leases=[(i, None) for i in held],
                    reason=f"outage: {type(exc).__name__}: {exc}"[:500],
                )
            self.leases.discard(held)
            log.warning("gave back %d leases after %s", n, type(exc).__name__)

    def _job_end(self, chunk: Chunk) -> int:
        """The job's item count (fixed once it is published), at least the chunk's end."""
        if chunk.job_id not in self._job_end_cache:
            with self.session_factory() as session:
                self._job_end_cache[chunk.job_id] = jobs.job_item_count(
                    session, job_id=chunk.job_id)
            if len(self._job_end_cache) > 10_000:
                self._job_end_cache.clear()
        return max(chunk.end, self._job_end_cache.get(chunk.job_id, chunk.end))

    def _max_attempts(self, job_id: str) -> int:
        if job_id not in self._max_attempts_cache:
            with self.session_factory() as session:
                self._max_attempts_cache[job_id] = jobs.job_max_attempts(session, job_id=job_id)
        return self._max_attempts_cache[job_id]

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
        queue: deque[_Batch],
    ) -> None:
        """The loop of ``run_chunk``: claim, prepare, infer, hand to the finisher, repeat."""

        def drain(keep: int = 0) -> None:
            while len(pending) > keep:
                pending.popleft().result()  # re-raises a finisher failure (DB down, ...)

        scope = _Scope(chunk, self._job_end(chunk),
                       time.monotonic() + self.settings.chunk_linger_seconds)
        queue.extend(self._claim(scope, report))
        while queue:
            batch = queue.popleft()
            if batch.careful:
                drain()  # nothing else in flight while a possible poison runs
                prepared = [
                    prepare(item, settings=self.settings, store=self.store)
                    for item in batch.items
                ]
            else:
                prepared = [f.result() for f in batch.prepared]
            next_claim: Future[list[_Batch]] | None = None
            if not batch.careful and not queue:
                # Overlap: claim + decode the next batch beside the model, off its thread.
                next_claim = self._claimer.submit(self._claim, scope, report, prefetch=True)
            try:
                served, prepared = self.cache.split(prepared, settle=drain)
                outputs, bad, info, infer_ms = infer(self.models, prepared)
                outputs += served
            finally:
                if next_claim is not None:
                    queue.extend(next_claim.result())
            pending.append(
                self._finisher.submit(
                    self._finish, batch, outputs, bad, info, infer_ms, report, progress
                )
            )
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
                    )
                queue.clear()
                break
            if self.should_stop():
                drain()
                break
            if not queue:
                drain()
                queue.extend(self._claim(scope, report))
        drain()
        if queue and self.should_stop():
            self._release(queue)
            queue.clear()

    def run_chunk(self, chunk: Chunk, progress: Progress | None = None) -> ChunkReport:
        """Process every claimable item of ``chunk``; returns what this worker did with them.

        Safe to run twice at once for the same chunk (claims and completion are fenced in the
        database). Raises on infrastructure failures (database/store down): the caller retries.
        """
        report = ChunkReport(job_id=chunk.job_id, start=chunk.start, end=chunk.end)
        t_start = time.perf_counter()
        pending: deque[Future[None]] = deque()
        queue: deque[_Batch] = deque()
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
                    self._give_back_held(exc)
                    raise
        finally:
            # On an error, let in-flight work settle before the leases stop being extended.
            for fut in pending:
                try:
                    fut.result()
                except Exception:
                    log.exception("finishing a batch failed")
            for batch in queue:
                for fut in batch.prepared:
                    fut.cancel()
            report.seconds = time.perf_counter() - t_start
            self._record_stages(report)
        return report

    def _release(self, batches: deque[_Batch]) -> None:
        """Give back the leases of claimed batches that will not run (a clean stop)."""
        from loom import jobs

        ids = [i.id for b in batches for i in b.items]
        for b in batches:
            for fut in b.prepared:
                fut.cancel()
        with self.session_factory() as session:
            jobs.release_leases(session, worker_id=self.worker_id, item_ids=ids)
        self.leases.discard(ids)

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
        while not self.should_stop():
            claimed = 0
            for chunk in chunks:
                claimed += self.run_chunk(chunk, progress=progress).claimed
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
                    jobs.maybe_finalize(session, job_id=job_id, store=self.store)
                    if self._job_status(job_id) == JobStatus.finalizing.value:
                        # The manifest write failed (store down): finish it, as the reconciler
                        # does in distributed mode; until the store is back, poll.
                        jobs.complete_finalization(session, job_id=job_id, store=self.store)
                status = self._job_status(job_id)
                if status is None or status in terminal:
                    break
                time.sleep(poll_seconds)  # backoff of retried items, or leases held elsewhere
        with self.session_factory() as session:
            return jobs.get_job(session, job_id=job_id)

    def _record_stages(self, report: ChunkReport) -> None:
        """Add a chunk's stage times to the process totals; with LOOM_STAGE_LOG set, write them
        to ``{stage_log}/{worker_id}.json`` (what bench/eta.py reads for its breakdown)."""
        with self._report_lock:
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
        self._claimer.shutdown(wait=True, cancel_futures=True)
        self._io.shutdown(wait=True, cancel_futures=True)
        self._finisher.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

