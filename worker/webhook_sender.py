"""Sends the webhooks of the jobs this process finalised, on a thread of its own.

Finalisation writes each job's ``job.completed`` delivery row in its terminal transaction
(``loom.jobs.deliveries``); this sender posts it right after, so a user's slow or dead URL holds
up neither the finisher nor the model. What it cannot send (the process dies, the receiver is
down) stays pending and every worker's reconciler retries it with backoff.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from loom.fetch import WEBHOOK_POLICY, AddressPolicy

if TYPE_CHECKING:  # pragma: no cover
    from sqlalchemy.orm import Session, sessionmaker

    from loom.models import Job


class WebhookSender:
    def __init__(self, session_factory: sessionmaker[Session], *,
                 policy: AddressPolicy = WEBHOOK_POLICY) -> None:
        self.session_factory = session_factory
        self.policy = policy  # the SSRF guard's (tests pin their receiver's port through)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loom-webhook")

    def finalized(self, job: Job) -> None:
        """The ``on_finalized`` callback of every finalising call the engine makes."""
        if job.webhook_url:
            self._pool.submit(self._send, job.id)

    def _send(self, job_id: str) -> None:
        from loom import webhooks

        with self.session_factory() as session:
            webhooks.send_due_quietly(session, job_ids=[job_id], policy=self.policy)

    def close(self) -> None:
        # Let queued sends finish: an embedded run has no reconciler to send them later.
        self._pool.shutdown(wait=True)
