"""The claimer's fair-share step (loom.jobs.shares decides; this keeps its state fresh): before
a claim from the message's own job, serve the tenant or lane that is owed a batch, through a
fill narrowed to it. PostgreSQL only; off with ``fair_share = False``.

The state is one statement, read at most every ``REFRESH_SECONDS`` per job; between reads the
worker counts its own claims into it, so consecutive decisions do not all go the same way.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from loom import jobs
from loom.jobs import shares
from loom.models import utcnow

if TYPE_CHECKING:  # pragma: no cover
    from loom.jobs import ClaimedItem
    from worker.batches import StageParts

REFRESH_SECONDS = 0.25
WAIT_SECONDS = 0.5  # a tenant at its running cap: how often to look again


class FairShare:
    def __init__(self, parts: StageParts) -> None:
        self.settings = parts.settings
        self.session_factory = parts.session_factory
        self.worker_id = parts.worker_id
        self.facts = parts.facts
        self.defaults = jobs.Limits.from_settings(parts.settings)
        self._state: shares.ShareState | None = None
        self._state_job: str | None = None
        self._read_at = 0.0

    @staticmethod
    def applies(parts: StageParts) -> bool:
        bind = parts.session_factory.kw.get("bind")
        return bool(parts.settings.fair_share) and bind is not None \
            and bind.dialect.name == "postgresql"

    def _fresh(self, job_id: str) -> shares.ShareState:
        now = time.monotonic()
        if self._state is None or self._state_job != job_id \
                or now - self._read_at > REFRESH_SECONDS:
            with self.session_factory() as session:
                self._state = shares.share_state(
                    session, like=job_id, now=utcnow(),
                    window=self.settings.fair_share_window_seconds,
                    fast_max_items=self.settings.fast_lane_max_items, defaults=self.defaults)
            self._state_job, self._read_at = job_id, now
        return self._state

    def decide(self, job_id: str, *, dry: bool = False) -> shares.Decision:
        """Whom to serve before ``job_id``'s own items (``dry``: it has none left, the message
        fills from other jobs); waits while its tenant is at its running cap and nobody else
        can be served."""
        while True:
            decision = shares.choose(
                self._fresh(job_id), own_items=self.facts.item_count(job_id),
                batch=self.settings.batch_size, fast_max_items=self.settings.fast_lane_max_items,
                fast_max_share=self.settings.fast_lane_max_share, own_dry=dry)
            if not decision.wait:
                return decision
            time.sleep(WAIT_SECONDS)
            self._read_at = 0.0

    def claim_for(self, job_id: str, decision: shares.Decision,
                  limit: int) -> list[ClaimedItem]:
        """Lease up to ``limit`` items of the decision's tenant (any, when None) and lane."""
        with self.session_factory() as session:
            return jobs.claim_fill(
                session, like=job_id, worker_id=self.worker_id, limit=limit,
                lease_seconds=self.settings.lease_seconds, now=utcnow(),
                tenant_id=decision.tenant_id,
                job_items=decision.job_items or (0, 2**31 - 1))

    def count(self, items: list[ClaimedItem]) -> None:
        """This worker's claims since the state was read."""
        if self._state is None:
            return
        small = self.settings.fast_lane_max_items
        for item in items:
            self._state.count(item.tenant_id, 1,
                              small=self.facts.item_count(item.job_id) <= small)

    def urgent_items(self, job_id: str, limit: int, *, filling: bool = False) -> list[ClaimedItem]:
        """Between batches: fresh items of fast-lane jobs, if any wait and the lane is within
        its share (as the last state read says). ``filling``: the message's own job is dry and
        its batches come from other jobs, so a small message job says nothing about them."""
        small = self.settings.fast_lane_max_items
        if small < 1 or (not filling and self.facts.item_count(job_id) <= small):
            return []  # the message is itself in the fast lane
        st = self._state
        if st is not None and st.total and self.settings.fast_lane_max_share < 1.0 \
                and st.total_small / st.total >= self.settings.fast_lane_max_share:
            return []
        with self.session_factory() as session:
            if not shares.fast_lane_waiting(session, like=job_id, small=small, now=utcnow()):
                return []
        return self.claim_for(job_id, shares.Decision(None, (0, small)), limit)
