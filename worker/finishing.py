"""The finisher (the engine's last stage, on a thread of its own): a batch's outputs encoded and
stored (off the model thread), then completed, failed or given back in one transaction per
batch, fenced by lease; the jobs that drains are finalised, a few batches' worth together, and
their webhooks handed to the sender.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from loom import jobs, tasks
from loom.errors import InfrastructureError, LoomError, ModelError
from worker.batches import Batch, ChunkReport, Progress, StageParts
from worker.outputs import store_output

if TYPE_CHECKING:  # pragma: no cover
    from loom.jobs import ItemFailure, ItemResult
    from worker.outages import OutageGuard
    from worker.runner import BatchOutput
    from worker.webhook_sender import WebhookSender

log = logging.getLogger("worker.engine")

# How long a drained job may wait for others to be finalised with it (see finalize_drained).
FINALIZE_GROUP_SECONDS = 0.2


class Finisher:
    def __init__(self, parts: StageParts, *, outages: OutageGuard,
                 webhooks: WebhookSender) -> None:
        self.settings = parts.settings
        self.session_factory = parts.session_factory
        self.store = parts.store
        self.worker_id = parts.worker_id
        self.leases = parts.leases
        self.facts = parts.facts
        self.io = parts.io  # encoding and uploading images and vectors leave this thread
        self.outages = outages
        self.webhooks = webhooks
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loom-finish")
        self._drained: set[str] = set()  # jobs completions drained, not finalised yet
        self._drained_since: float | None = None

    def submit(self, batch: Batch, out: BatchOutput, report: ChunkReport,
               progress: Progress | None) -> Future[None]:
        """Finish ``batch`` on the finisher thread; the future raises what finishing raised
        (the database is down, ...)."""
        return self._thread.submit(self._finish, batch, out, report, progress)

    def finalize_now(self) -> None:
        """The chunk run is over: what it drained is finalised now (on the finisher thread)."""
        self._thread.submit(self.finalize_drained, now=True).result()

    def close(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)

    def _finish(self, batch: Batch, out: BatchOutput, report: ChunkReport,
                progress: Progress | None) -> None:
        outputs, bad, info, infer_ms = out.outputs, out.bad, out.info, out.infer_ms
        # The call's time is shared by the items it ran (cached outputs did not take part).
        n = out.inferred or len(outputs)
        futures: list[Future[ItemResult]] = []
        kind = tasks.get(batch.items[0].task).output
        for prep, out in outputs:
            timings = {**prep.timings, "infer_ms": infer_ms, "infer_batch_size": float(n)}
            if kind != "text":  # encoding and uploading leave the finisher thread
                futures.append(self.io.submit(
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
        # A filled batch holds items of several jobs (loom.jobs.fill): each has its job's cap.
        claimed = {i.id: i for i in batch.items}
        permanent = sum(1 for f in failures if self.facts.final(claimed[f.item_id], f.error))
        t_complete = time.perf_counter()
        released = 0
        if outage:
            # Before the release: a claim racing it must wait for the store, not spin.
            self.outages.store_down()
        # The lease rows this batch ends (of which it holds the last items): deleted with the
        # completion when that is all there is to write, else once everything is written.
        ending = self.leases.ending(claimed)
        alone = not outage and not failures
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
                # Jobs of which this worker holds other items cannot be drained by this batch:
                # their completion skips the "any open items left?" read (one round trip).
                busy = self.leases.jobs(excluding=claimed)
                won = jobs.complete_items(
                    session, worker_id=self.worker_id, results=results, store=self.store,
                    open_jobs=busy, on_drained=self._drained.update,
                    on_finalized=self.webhooks.finalized, end_leases=ending if alone else (),
                )
            if failures:
                jobs.fail_items(
                    session,
                    worker_id=self.worker_id,
                    failures=failures,
                    backoff_seconds=self.settings.retry_backoff_seconds,
                    store=self.store,
                    on_finalized=self.webhooks.finalized,
                )
            if ending and not (alone and results):
                jobs.end_leases(session, worker_id=self.worker_id, lease_ids=ending)
        complete_ms = (time.perf_counter() - t_complete) * 1000.0
        self.leases.discard(i.id for i in batch.items)
        with report.lock:
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
        t_final = time.perf_counter()
        # Holding nothing else (an idle worker's last batch): no batch will follow to group with;
        # a fast-lane batch's jobs are waited for by someone.
        self.finalize_drained(now=batch.urgent or not self.leases.held())
        with report.lock:
            report.add_timing("complete", (time.perf_counter() - t_final) * 1000.0)

    def finalize_drained(self, *, now: bool = False) -> None:
        """Finalise the jobs completions drained (finisher thread), together once the first of
        them has waited ``FINALIZE_GROUP_SECONDS`` or ``now`` (the chunk run is over).

        Small jobs filled into the same batches drain a few per batch, and finalising costs
        about a dozen statements per call whatever the number of jobs; grouping the jobs of a
        few batches cuts that several times over. A one-item job on an idle worker is not
        delayed: a worker that holds no other lease finalises at once, and so does the end of a
        chunk run. A job left here by a crash is finalised by the reconciler (no open items
        left)."""
        if not self._drained:
            return
        started = time.monotonic()
        if self._drained_since is None:
            self._drained_since = started
        if not now and started - self._drained_since < FINALIZE_GROUP_SECONDS:
            return
        job_ids, self._drained, self._drained_since = self._drained, set(), None
        with self.session_factory() as session:
            jobs.finalize_jobs(session, job_ids=job_ids, store=self.store, drained=True,
                               on_finalized=self.webhooks.finalized)
