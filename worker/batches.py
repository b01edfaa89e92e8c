"""What one chunk run holds (the report it returns, the scope it claims from, its batches), and
the engine state its stages share.

Shared by the engine (worker.engine) and its stages (worker.claiming, worker.finishing).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from sqlalchemy.orm import Session, sessionmaker

    from loom.config import Settings
    from loom.jobs import Chunk, ClaimedItem
    from loom.storage import Store
    from worker.inputs import Prepared
    from worker.leases import LeaseKeeper

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


class EngineState:
    """What the engine's stages (worker.claiming, worker.finishing, worker.outages) read from the
    engine that mixes them in: declared once, set by ``Engine.__init__``."""

    settings: Settings
    session_factory: sessionmaker[Session]
    store: Store
    worker_id: str
    leases: LeaseKeeper
    _io: ThreadPoolExecutor
    decode_on_model_thread: bool
    _report_lock: threading.Lock
    _store_down: threading.Event
    _fill_quiet_until: float  # monotonic time before which no fill is tried (worker.claiming)
    _drained: set[str]  # jobs completions drained, not finalised yet (worker.finishing)
    _drained_since: float | None
    _job_end_cache: dict[str, int]
    _max_attempts_cache: dict[str, int]
    _max_attempts: Callable[[str], int]
    _await_store: Callable[[], None]
