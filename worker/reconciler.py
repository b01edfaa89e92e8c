"""The worker-side reconciler: a daemon thread that calls ``loom.jobs.reconcile`` periodically.

Every worker process runs one (started in ``worker_process_init``); ``reconcile`` is idempotent,
so several at once are harmless. It publishes outbox rows that a crash left unpublished, turns
expired leases back into claimable items (or ``failed``/worker_lost at the attempt cap), and
re-publishes chunks whose items sit queued with no live message.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(
        self,
        *,
        session_factory: sessionmaker[Session],
        publish: Callable[[Any], None],
        interval_seconds: float,
        stale_after_seconds: float,
        store: Any = None,
        sweep_interval_seconds: float = 0.0,
        orphan_grace_seconds: float = 3600.0,
    ) -> None:
        self.store = store  # lets a reconciler-side finalisation write the results manifest
        # The orphan sweep (loom/orphans.py) lists the store: far less often than reconcile.
        self.sweep_interval_seconds = sweep_interval_seconds
        self.orphan_grace_seconds = orphan_grace_seconds
        self._next_sweep = time.monotonic() + sweep_interval_seconds * random.uniform(0.1, 1.0)
        self.swept = 0
        self.session_factory = session_factory
        self.publish = publish
        self.interval_seconds = interval_seconds
        self.stale_after_seconds = stale_after_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.runs = 0

    def run_once(self) -> Any:
        from loom import jobs, webhooks

        with self.session_factory() as session:
            report = jobs.reconcile(
                session,
                publish=self.publish,
                stale_after_seconds=self.stale_after_seconds,
                store=self.store,
            )
            try:  # webhooks: enqueue started/progress, send due deliveries (with backoff)
                webhooks.tick(session)
            except Exception:
                log.exception("webhook delivery failed")
            if self.store is not None:
                try:  # OpenAI-compatible batches: expiry, and the files of finished ones
                    from loom import openai_batches

                    openai_batches.tick(session, self.store)
                except Exception:
                    log.exception("refreshing OpenAI batches failed")
        self.runs += 1
        if (self.store is not None and self.sweep_interval_seconds > 0
                and time.monotonic() >= self._next_sweep):
            self._next_sweep = time.monotonic() + self.sweep_interval_seconds
            self.sweep_once()
        return report

    def sweep_once(self) -> int:
        from loom.orphans import sweep_orphans

        with self.session_factory() as session:
            n = sweep_orphans(session, self.store, grace_seconds=self.orphan_grace_seconds)
        self.swept += n
        return n

    def _loop(self) -> None:
        # A little jitter so that the workers of a fleet do not all reconcile in the same instant.
        delay = self.interval_seconds * random.uniform(0.1, 1.0)
        while not self._stop.wait(delay):
            try:
                self.run_once()
            except Exception:  # DB or broker briefly down: try again next interval
                log.exception("reconcile failed")
            delay = self.interval_seconds

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="loom-reconciler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
