"""Giving leases back: a worker that stops cleanly (Ctrl-C on an embedded run, a graceful
shutdown) returns the items it claimed but never ran, so they are claimable at once instead of
after the lease expires.

Only for items whose attempt did NOT run: the claim's attempt is refunded, so a resumed run
treats them as fresh (not as suspects that may have crashed their worker, which run alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import update
from sqlalchemy.orm import Session

from loom.db import begin_write
from loom.models import Item, ItemStatus, utcnow


def release_leases(
    session: Session,
    *,
    worker_id: str,
    item_ids: Sequence[int] | None = None,
    now: datetime | None = None,
) -> int:
    """Put back ``worker_id``'s running items (all of them, or those of ``item_ids``) as queued
    and claimable now; returns how many. Fenced like every worker write: an item whose lease
    another worker took over is not touched."""
    now = now or utcnow()
    begin_write(session)
    stmt = update(Item).where(
        Item.status == ItemStatus.running.value, Item.lease_owner == worker_id
    )
    if item_ids is not None:
        if not item_ids:
            session.rollback()
            return 0
        stmt = stmt.where(Item.id.in_(list(item_ids)))
    result = session.execute(
        stmt.values(
            status=ItemStatus.queued.value,
            lease_owner=None,
            lease_expires_at=None,
            available_at=None,
            # Not spent, but the attempt NUMBER stays used: numbers never repeat (the fence).
            attempts_excused=Item.attempts_excused + 1,
            started_at=None,
            updated_at=now,
        ).execution_options(synchronize_session=False)
    )
    session.commit()
    return int(result.rowcount)  # type: ignore[attr-defined]
