"""Keeping the leases of the items an Engine holds alive while a chunk runs."""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager

from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)


class LeaseKeeper:
    """The item ids this worker holds (with their jobs), and a heartbeat thread that extends
    their leases (``jobs.heartbeat``) every ``interval_seconds`` while ``heartbeating()`` is
    active.

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
        self._held: dict[int, str] = {}  # item id -> its job id
        self._lock = threading.Lock()

    def add(self, items: Iterable[tuple[int, str]]) -> None:
        """Hold these (item id, job id) leases."""
        with self._lock:
            self._held.update(items)

    def discard(self, item_ids: Iterable[int]) -> None:
        with self._lock:
            for i in item_ids:
                self._held.pop(i, None)

    def held(self) -> list[int]:
        with self._lock:
            return sorted(self._held)

    def jobs(self, *, excluding: Collection[int] = ()) -> set[str]:
        """The jobs of the leases held, leaving out ``excluding`` (a batch being completed):
        each of these jobs still has an open item, this worker's."""
        with self._lock:
            return {job for item, job in self._held.items() if item not in excluding}

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
