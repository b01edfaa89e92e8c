"""Keeping the leases of the items an Engine holds alive while a chunk runs."""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:  # pragma: no cover
    from loom.jobs import ClaimedItem

log = logging.getLogger(__name__)


class LeaseKeeper:
    """The item ids this worker holds (with their jobs and the lease rows of the claims that
    took them), and a heartbeat thread that extends their leases (``jobs.heartbeat``) every
    ``interval_seconds`` while ``heartbeating()`` is active.

    A lease row ends with the last of its items this worker holds (``ending``): the finisher
    passes those to the completion, which deletes them (loom.jobs.leases).

    A lease lost anyway (a stall longer than the lease) is harmless: completion is fenced, so the
    stale result is dropped and the newer attempt wins."""

    def __init__(
        self,
        *,
        session_factory: sessionmaker[Session],
        worker_id: str,
        lease_seconds: float,
        interval_seconds: float,
    ) -> None:
        self.session_factory = session_factory
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self.interval_seconds = interval_seconds
        self._held: dict[int, tuple[str, int | None]] = {}  # item id -> (job id, lease row)
        self._lease_items: dict[int, set[int]] = {}  # lease row -> the held items it names
        self._lock = threading.Lock()

    def add(self, items: Iterable[ClaimedItem]) -> None:
        """Hold the leases of these claimed items."""
        with self._lock:
            for i in items:
                self._held[i.id] = (i.job_id, i.lease_id)
                if i.lease_id is not None:
                    self._lease_items.setdefault(i.lease_id, set()).add(i.id)

    def ending(self, item_ids: Iterable[int]) -> set[int]:
        """The lease rows of which ``item_ids`` are the last items held: done with once these
        are (whatever becomes of them)."""
        ids = set(item_ids)
        with self._lock:
            leases = {self._held[i][1] for i in ids if i in self._held}
            return {lease for lease in leases
                    if lease is not None and self._lease_items.get(lease, set()) <= ids}

    def discard(self, item_ids: Iterable[int]) -> None:
        with self._lock:
            for i in item_ids:
                _, lease = self._held.pop(i, (None, None))
                if lease is not None:
                    held = self._lease_items.get(lease)
                    if held is not None:
                        held.discard(i)
                        if not held:
                            del self._lease_items[lease]

    def held(self) -> list[int]:
        with self._lock:
            return sorted(self._held)

    def jobs(self, *, excluding: Collection[int] = ()) -> set[str]:
        """The jobs of the leases held, leaving out ``excluding`` (a batch being completed):
        each of these jobs still has an open item, this worker's."""
        with self._lock:
            return {job for item, (job, _) in self._held.items() if item not in excluding}

    def beat(self) -> int:
        """Extend every held lease once; returns how many this worker still holds."""
        from loom import jobs

        ids = self.held()
        if not ids:
            return 0
        with self.session_factory() as session:
            kept = jobs.heartbeat(
                session, item_ids=ids, worker_id=self.worker_id, lease_seconds=self.lease_seconds
            )
        if kept < len(ids):
            log.warning("%s lost %d of %d leases", self.worker_id, len(ids) - kept, len(ids))
        return kept

    @contextmanager
    def heartbeating(self) -> Iterator[None]:
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(self.interval_seconds):
                try:
                    self.beat()
                except Exception:  # DB blip: the next beat tries again
                    log.exception("heartbeat failed")

        thread = threading.Thread(target=loop, name="loom-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=30)
            with self._lock:
                self._held.clear()
                self._lease_items.clear()
