"""What one chunk run holds (the report it returns, the scope it claims from, its batches), and
what the engine's stages know of the jobs they touch.

Shared by the engine (worker.engine) and its stages (worker.claiming, worker.runner,
worker.finishing, worker.handlers).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loom import jobs

if TYPE_CHECKING:  # pragma: no cover
    from concurrent.futures import ThreadPoolExecutor

    from sqlalchemy.orm import Session, sessionmaker

    from loom.config import Settings
    from loom.storage import Store
    from worker.leases import LeaseKeeper

    from loom.errors import LoomError
    from loom.jobs import Chunk, ClaimedItem
    from worker.inputs import Prepared

Progress = Callable[[int], None]  # called with the number of items a batch finished


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
    filled: int = 0  # items of other jobs claimed to fill batches (loom.jobs.fill)
    batches: int = 0
    seconds: float = 0.0
    timings_ms: dict[str, float] = field(default_factory=dict)  # summed stage times
    # The claimer, the model thread and the finisher add to one report from three threads.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add_timing(self, name: str, ms: float) -> None:
        self.timings_ms[name] = self.timings_ms.get(name, 0.0) + ms


@dataclass
class Scope:
    """What ``run_chunk`` may claim from: its chunk, then (until ``linger_until``) the rest of
    the job. ``cancelling`` is set by whichever thread claimed last and saw the job cancelling,
    so the model thread never waits on that query."""

    chunk: Chunk
    linger_until: float
    lingering: bool = False
    cancelling: bool = False
    dry: bool = False  # the last claim of the current range came back short
    filling: bool = False  # the job is dry: batches are filled from other jobs (loom.jobs.fill)
    fill_dry: bool = False  # the last fill came back short


@dataclass
class Batch:
    items: list[ClaimedItem]
    careful: bool  # run alone: a previous attempt of this item died with its worker
    prepared: list[Future[Prepared]] = field(default_factory=list)
    # The fast lane's (worker/fair_share.py): runs before the batches already claimed, and its
    # jobs are finalised at once rather than grouped with later ones.
    urgent: bool = False


@dataclass(frozen=True)
class StageParts:
    """What the engine's stages share, explicitly: the process's settings and connections, its
    lease keeper, the I/O pool (inputs read and decoded, outputs encoded and uploaded) and the
    facts of the jobs seen. Each stage keeps the rest of its state to itself."""

    settings: Settings
    session_factory: sessionmaker[Session]
    store: Store
    worker_id: str
    leases: LeaseKeeper
    facts: JobFacts
    io: ThreadPoolExecutor


class JobFacts:
    """What stays fixed about a job once it is published, read once per process: its item count
    (the end of the range a lingering claim may take) and its attempt cap. A claim's head read
    fills both for free (``seen``); the rest are read on demand."""

    LIMIT = 10_000  # one entry per job seen: bounded

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self.session_factory = session_factory
        self._item_count: dict[str, int] = {}
        self._max_attempts: dict[str, int] = {}

    def seen(self, job_id: str, *, item_count: int, max_attempts: int) -> None:
        if len(self._item_count) > self.LIMIT:
            self._item_count.clear()
            self._max_attempts.clear()
        self._item_count.setdefault(job_id, item_count)
        self._max_attempts.setdefault(job_id, max_attempts)

    def item_count(self, job_id: str) -> int:
        if job_id not in self._item_count:
            with self.session_factory() as session:
                self._item_count[job_id] = jobs.job_item_count(session, job_id=job_id)
        return self._item_count[job_id]

    def max_attempts(self, job_id: str) -> int:
        if job_id not in self._max_attempts:
            with self.session_factory() as session:
                self._max_attempts[job_id] = jobs.job_max_attempts(session, job_id=job_id)
        return self._max_attempts[job_id]

    def final(self, item: ClaimedItem, error: LoomError) -> bool:
        """Whether a failure of ``item`` ends it: permanent, or its attempts are spent."""
        return not error.transient or item.attempts >= self.max_attempts(item.job_id)
