"""The claimer (the engine's first stage): batches under a lease from the chunk, then from the
rest of its job while ``chunk_linger_seconds`` allows, then filled from other jobs; suspects run
alone; a clean stop gives back what was claimed but not run. The inputs of a claimed batch start
loading in the I/O pool at once.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import replace
from typing import TYPE_CHECKING

from loom import jobs, tasks
from loom.jobs.types import CLAIMABLE_JOB
from loom.models import JobStatus, utcnow
from worker.batches import Batch, ChunkReport, Scope, StageParts
from worker.fair_share import FairShare
from worker.inputs import load, prepare

if TYPE_CHECKING:  # pragma: no cover
    from concurrent.futures import Future

    from sqlalchemy.orm import Session

    from loom.jobs import Chunk, ClaimedItem
    from worker.inputs import Prepared
    from worker.outages import OutageGuard


# After a fill that found nothing, a process does not ask again for this long. Skipping a fill
# never strands work (every job has its own message); asking after every small job cost each one
# two statements (a few ms here) when there was nothing to share a batch with.
FILL_QUIET_SECONDS = 0.1


class Claimer:
    def __init__(self, parts: StageParts, *, outages: OutageGuard,
                 decode_on_model_thread: bool) -> None:
        self.settings = parts.settings
        self.session_factory = parts.session_factory
        self.store = parts.store
        self.worker_id = parts.worker_id
        self.leases = parts.leases
        self.facts = parts.facts
        self.io = parts.io
        self.outages = outages
        # Where inputs are decoded: beside the model in the I/O pool (a GPU host: the model
        # thread mostly waits on the device), or on the model thread just before the batch runs
        # (a CPU host whose cores the model processes fill: worker.sizing explains why).
        self.decode_on_model_thread = decode_on_model_thread
        self._fill_quiet_until = 0.0  # monotonic time before which no fill is tried
        self.fair = FairShare(parts) if FairShare.applies(parts) else None

    def claim(self, scope: Scope, report: ChunkReport, *, prefetch: bool = False) -> list[Batch]:
        """Claim the next batch(es) from the chunk and, once it is dry, from the rest of its job
        (while ``chunk_linger_seconds`` allows); once the job is dry too, fill the batch from
        other jobs (``batch_fill``). Their inputs start loading at once. Before any of that, the
        fair-share step may serve another tenant or lane first (worker/fair_share.py)."""
        if self.fair is not None and not scope.cancelling:
            # A prefetch leaves the fast lane alone: what it claims waits for the batch in
            # flight, while the check between batches (claim_urgent) of whichever process gets
            # there first runs a fast-lane job at once (bench/fair_share.py: a one-item job
            # beside a large one waited a whole batch longer when prefetches took it).
            served = ((not prefetch and self.claim_urgent(scope, report))
                      or self._serve_first(scope, report, prefetch=prefetch))
            if served:
                return served
        batches = [] if scope.filling else self._claim_job(scope, report, prefetch=prefetch)
        if self.fair is not None:
            self.fair.count([i for b in batches for i in b.items])
        # The first fill rides on a prefetch, beside the model: a job's own first batch starts
        # without waiting for it (a one-item job's latency). A message that found nothing of
        # its own (a filler took its items) fills at once: it has no batch to wait for, and
        # ending it would leave the process working through such messages one by one while
        # compatible work waits (a stall of about a second per thousand small jobs).
        found_nothing = not batches and report.claimed == 0
        if (not (prefetch or scope.filling or found_nothing)
                or not self._may_fill(scope, batches, report)):
            return batches
        scope.filling = True
        fresh = batches[-1] if batches else Batch([], careful=False)
        want = self.settings.batch_size - len(fresh.items)
        if want < 1 or (prefetch and scope.fill_dry and not batches):
            return batches  # full, or the last fill came back short: ask after the batch
        if time.monotonic() < self._fill_quiet_until:
            return batches  # a fill found nothing moments ago (see FILL_QUIET_SECONDS)
        t0 = time.perf_counter()
        # A prefetch fills from bulk jobs only; fast-lane jobs are for the check between batches.
        small = self.settings.fast_lane_max_items if prefetch and self.fair is not None else -1
        with self.session_factory() as session:
            items = jobs.claim_fill(session, like=scope.chunk.job_id, worker_id=self.worker_id,
                                    limit=want, lease_seconds=self.settings.lease_seconds,
                                    now=utcnow(), job_items=(small + 1, 2**31 - 1))
            items = self._with_metadata(session, items)
        if not items:
            self._fill_quiet_until = time.monotonic() + FILL_QUIET_SECONDS
        self.leases.add(items)
        with report.lock:
            report.add_timing("claim", (time.perf_counter() - t0) * 1000.0)
        scope.fill_dry = len(fresh.items) + len(items) < self.settings.batch_size
        if not items:
            return batches
        report.claimed += len(items)
        report.filled += len(items)
        if self.fair is not None:
            self.fair.count(items)  # a fill is a claim too: the lane's share counts it
        fresh.items.extend(items)
        fresh.prepared.extend(self._start_loading(items))
        return batches or [fresh]

    def claim_urgent(self, scope: Scope, report: ChunkReport) -> list[Batch]:
        """Before the next of the batches already claimed: a fast-lane batch, if one waits (it
        runs first, so a one-item job waits for the batch in flight only)."""
        if self.fair is None or scope.cancelling:
            return []
        t0 = time.perf_counter()
        items = self.fair.urgent_items(scope.chunk.job_id, self.settings.batch_size,
                                       filling=scope.filling)
        return self._served(items, report, t0, urgent=True)

    def _serve_first(self, scope: Scope, report: ChunkReport, *,
                     prefetch: bool = False) -> list[Batch]:
        """A batch of the tenant or lane the fair-share step says is owed one, if any (not the
        fast lane's in a prefetch: see ``claim``)."""
        assert self.fair is not None
        decision = self.fair.decide(scope.chunk.job_id, dry=scope.filling)
        fast_lane = decision.job_items is not None and decision.job_items[0] == 0
        if decision.tenant_id is None or (prefetch and fast_lane):
            return []
        t0 = time.perf_counter()
        items = self.fair.claim_for(scope.chunk.job_id, decision, self.settings.batch_size)
        return self._served(items, report, t0, urgent=fast_lane)

    def _served(self, items: list[ClaimedItem], report: ChunkReport, t0: float, *,
                urgent: bool) -> list[Batch]:
        assert self.fair is not None
        if items:
            with self.session_factory() as session:
                items = self._with_metadata(session, items)
        with report.lock:
            report.add_timing("claim", (time.perf_counter() - t0) * 1000.0)
        if not items:
            return []
        self.fair.count(items)
        self.leases.add(items)
        report.claimed += len(items)
        report.filled += len(items)
        return [Batch(items, careful=False, prepared=self._start_loading(items), urgent=urgent)]

    def _may_fill(self, scope: Scope, batches: list[Batch], report: ChunkReport) -> bool:
        """Fill only once the job has nothing left to claim here (its last claim came back short
        and lingering is over or not needed), never beside a suspect, within the linger time."""
        if not self.settings.batch_fill or scope.cancelling:
            return False
        if time.monotonic() >= scope.linger_until:
            return False
        if scope.filling:
            return True
        if any(b.careful for b in batches) or not scope.dry:
            return False
        return scope.lingering or not self._may_linger(scope)

    def _claim_job(self, scope: Scope, report: ChunkReport, *, prefetch: bool) -> list[Batch]:
        """Claim from the chunk and, once it is dry, from the rest of its job."""
        chunk = scope.chunk
        # A claim that came back short left its range dry: a prefetch (beside the model) does
        # not ask again; the claim after the batch does (a backoff may have ended meanwhile).
        skip = prefetch and scope.dry
        if not scope.lingering:
            if not skip:
                batches = self._claim_range(scope, chunk, report, prefetch=prefetch)
                if batches or scope.cancelling or not self._may_linger(scope):
                    return batches
            elif not self._may_linger(scope):
                return []
            scope.lingering, scope.dry, skip = True, False, False
        if skip or not self._may_linger(scope):
            return []
        whole = jobs.Chunk(chunk.job_id, 0, self._job_end(chunk), chunk.priority)
        batches = self._claim_range(scope, whole, report, prefetch=prefetch)
        report.lingered += sum(1 for b in batches for i in b.items
                               if not chunk.start <= i.index < chunk.end)
        return batches

    def _may_linger(self, scope: Scope) -> bool:
        chunk = scope.chunk
        return (self._job_end(chunk) > chunk.end - chunk.start and not scope.cancelling
                and time.monotonic() < scope.linger_until)

    def _claim_range(self, scope: Scope, chunk: Chunk, report: ChunkReport, *,
                     prefetch: bool) -> list[Batch]:
        """Claim from [chunk.start, chunk.end).

        ``prefetch``: claiming while another batch is in flight. A suspect is then not claimed
        (a crash of the running batch would burn one of its attempts); it waits until nothing
        else is in flight. A suspect's input is read and decoded only once it runs (alone).
        A job seen cancelling sets ``scope.cancelling`` and claims nothing."""
        if self.outages.store_is_down:
            if prefetch:
                return []  # claim again once the batch in flight is done and the store is back
            self.outages.await_store()

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
                items = self._with_metadata(session, items)
            self.leases.add(items)
            with report.lock:
                report.add_timing("claim", (time.perf_counter() - t0) * 1000.0)
            return items

        t0 = time.perf_counter()
        with self.session_factory() as session:
            # One read (one statement on PostgreSQL): the status, the item count and the cap
            # (cached: fixed once the job is published), and the chunk's suspects.
            head = jobs.claim_head(session, chunk=chunk, limit=self.settings.batch_size)
        with report.lock:
            report.add_timing("claim", (time.perf_counter() - t0) * 1000.0)
        self.facts.seen(chunk.job_id, item_count=head.item_count, max_attempts=head.max_attempts)
        if head.status == JobStatus.cancelling.value:
            scope.cancelling = True
            return []
        if head.status not in CLAIMABLE_JOB:
            # Final (or finalizing): a stale message, or one whose items other processes took.
            # Nothing to claim, so no further queries.
            scope.dry = True
            return []
        suspects = head.suspects
        if suspects and prefetch:
            return []
        batches: list[Batch] = []
        for index in suspects:
            items = claim(index, index + 1, 1)
            if items:
                batches = [Batch(items, careful=True)]
                break
        if not batches:
            size = self.settings.batch_size
            want = size * self.settings.claim_batches
            items = claim(chunk.start, chunk.end, want)
            scope.dry = len(items) < want
            if not items:
                return []
            with self.session_factory() as session:
                suspect = jobs.suspect_ids(
                    session, item_ids=[i.id for i in items if i.attempts > 1])
            fresh = [i for i in items if i.id not in suspect]
            retried = [i for i in items if i.id in suspect]
            # Race with an expiring lease: run the others together first, then each suspect
            # alone.
            batches.extend(Batch(fresh[k:k + size], careful=False)
                           for k in range(0, len(fresh), size))
            batches.extend(Batch([i], careful=True) for i in retried)
        for batch in batches:
            report.claimed += len(batch.items)
            # A task with a handler of its own (training) reads its inputs itself.
            if not batch.careful and tasks.get(batch.items[0].task).batched:
                batch.prepared = self._start_loading(batch.items)
        return batches

    @staticmethod
    def _with_metadata(session: Session, items: list[ClaimedItem]) -> list[ClaimedItem]:
        """Items whose job fills a prompt template from its rows, with their metadata (one
        read for the claim; claims themselves never carry metadata)."""
        need = [i.id for i in items if tasks.uses_row_fields(i.params)]
        if not need:
            return items
        found = jobs.items_metadata(session, item_ids=need)
        return [replace(i, metadata=found.get(i.id)) if i.id in found else i for i in items]

    def _start_loading(self, items: list[ClaimedItem]) -> list[Future[Prepared]]:
        """Read the items' inputs in the I/O pool, and decode them there too unless the model
        thread decodes them (``decode_on_model_thread``)."""
        step = load if self.decode_on_model_thread else prepare
        return [self.io.submit(step, item, settings=self.settings, store=self.store)
                for item in items]

    def _job_end(self, chunk: Chunk) -> int:
        """The job's item count (fixed once it is published), at least the chunk's end."""
        return max(chunk.end, self.facts.item_count(chunk.job_id))

    def release(self, batches: deque[Batch]) -> None:
        """Give back the leases of claimed batches that will not run (a clean stop)."""
        ids = [i.id for b in batches for i in b.items]
        for b in batches:
            for fut in b.prepared:
                fut.cancel()
        with self.session_factory() as session:
            jobs.release_leases(session, worker_id=self.worker_id, item_ids=ids)
        self.leases.discard(ids)
