"""The finishing stage (the finisher thread): a batch's outputs encoded and stored (off the model
thread), then completed, failed or given back in one transaction per batch, fenced by lease. A
mixin of worker.engine.Engine, which owns the state it uses.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from loom import jobs, tasks
from loom.errors import InfrastructureError, LoomError, ModelError
from worker.batches import Batch, ChunkReport, EngineState, Progress
from worker.outputs import store_output

if TYPE_CHECKING:  # pragma: no cover
    from loom.jobs import ItemFailure, ItemResult
    from worker.inputs import Prepared

log = logging.getLogger("worker.engine")

# How long a drained job may wait for others to be finalised with it (see finalize_drained).
FINALIZE_GROUP_SECONDS = 0.2


class Finishing(EngineState):
    def _finish(
        self,
        batch: Batch,
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
        # A filled batch holds items of several jobs (loom.jobs.fill): each has its job's cap.
        claimed = {i.id: i for i in batch.items}
        permanent = sum(
            1 for f in failures
            if not f.error.transient
            or claimed[f.item_id].attempts >= self._max_attempts(claimed[f.item_id].job_id)
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
                # Jobs of which this worker holds other items cannot be drained by this batch:
                # their completion skips the "any open items left?" read (one round trip).
                busy = self.leases.jobs(excluding=claimed)
                won = jobs.complete_items(
                    session, worker_id=self.worker_id, results=results, store=self.store,
                    open_jobs=busy, on_drained=self._drained.update,
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
        t_final = time.perf_counter()
        # Holding nothing else (an idle worker's last batch): no batch will follow to group with.
        self.finalize_drained(now=not self.leases.held())
        with self._report_lock:
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
            jobs.finalize_jobs(session, job_ids=job_ids, store=self.store, drained=True)
