"""The outage guard: outages are no item's fault. It probes a dependency that is down with
backoff, holds claims while the store is down, and gives the leases held back (attempts excused)
once the database answers again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy.exc import InterfaceError
from sqlalchemy.exc import OperationalError as DBOperationalError

from loom import jobs
from loom.errors import InfrastructureError

if TYPE_CHECKING:  # pragma: no cover
    from sqlalchemy.orm import Session, sessionmaker

    from loom.storage import Store
    from worker.leases import LeaseKeeper

log = logging.getLogger("worker.engine")

# Probing a dependency that is down: first retry after OUTAGE_BACKOFF_MIN s, doubling up to MAX.
OUTAGE_BACKOFF_MIN_SECONDS = 0.5
OUTAGE_BACKOFF_MAX_SECONDS = 5.0


def is_outage(exc: BaseException) -> bool:
    """A dependency is down (store or database): not a property of the items in flight."""
    from loom.storage import is_outage as store_outage

    return isinstance(exc, (InfrastructureError, DBOperationalError, InterfaceError)) or (
        store_outage(exc)
    )


class OutageGuard:
    def __init__(self, *, session_factory: sessionmaker[Session], store: Store, worker_id: str,
                 leases: LeaseKeeper) -> None:
        self.session_factory = session_factory
        self.store = store
        self.worker_id = worker_id
        self.leases = leases
        # Set by the finisher when a store call failed for want of a store; claims wait on it.
        self._store_down = threading.Event()

    def store_down(self) -> None:
        """A store call failed because the store is down: claims wait until it answers."""
        self._store_down.set()

    @property
    def store_is_down(self) -> bool:
        return self._store_down.is_set()

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

    def await_store(self) -> None:
        from loom.storage import probe

        self._await("object store", lambda: probe(self.store))
        self._store_down.clear()

    def await_database(self) -> None:
        def ping() -> None:
            with self.session_factory() as session:
                jobs.ping(session)

        self._await("database", ping)

    def give_back_held(self, exc: BaseException) -> None:
        """After an outage ended the chunk: once the database answers, the leases this worker
        still holds go back to the queue with their attempts excused (not spent)."""
        self.await_database()
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
