"""Giving leases back after an outage, without spending the items' attempts.

A store (or database) outage is not a property of the items a worker holds: the worker hands
their leases back with ``release_items``, waits until the dependency answers again, and claims
them anew. The release excuses the attempt (``attempts_excused += 1``), so an outage longer than
the attempts' total backoff still fails no item; ``attempts`` itself never decreases, so the
attempt numbers the completion fence pins stay unique per item.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, false, or_, text, tuple_, update
from sqlalchemy.orm import Session

from loom.db import begin_write
from loom.jobs.types import add_events
from loom.models import Item, ItemStatus, utcnow


def ping(session: Session) -> None:
    """Raises while the database is unreachable (the engine's probe during an outage)."""
    session.execute(text("SELECT 1"))


def _owned(worker_id: str, leases: Sequence[tuple[int, int | None]]) -> Any:
    """Rows this worker still holds, at the claimed attempt when one is given."""
    plain = [item_id for item_id, attempt in leases if attempt is None]
    pinned = [(item_id, attempt) for item_id, attempt in leases if attempt is not None]
    return and_(
        or_(
            Item.id.in_(plain) if plain else false(),
            tuple_(Item.id, Item.attempts).in_(pinned) if pinned else false(),
        ),
        Item.status == ItemStatus.running.value,
        Item.lease_owner == worker_id,
    )


def release_items(
    session: Session,
    *,
    worker_id: str,
    leases: Sequence[tuple[int, int | None]],
    reason: str,
    now: datetime | None = None,
) -> int:
    """Put the items this worker holds back to ``queued`` (claimable at once) and excuse the
    attempt their claim counted. ``leases``: (item id, claimed attempt or None). Fenced like
    completion: a lease taken over meanwhile is left alone. Returns how many were released."""
    if not leases:
        return 0
    now = now or utcnow()
    begin_write(session)
    rows = session.execute(
        update(Item)
        .where(_owned(worker_id, leases))
        .values(status=ItemStatus.queued.value, lease_owner=None, lease_expires_at=None,
                available_at=None, attempts_excused=Item.attempts_excused + 1, updated_at=now)
        .returning(Item.id, Item.job_id, Item.attempts, Item.started_at)
        .execution_options(synchronize_session=False)
    ).all()
    add_events(session, [
        {"job_id": r.job_id, "item_id": r.id, "kind": "released", "attempt": r.attempts,
         "worker_id": worker_id, "message": reason, "claimed_at": r.started_at,
         "created_at": now} for r in rows
    ])
    session.commit()
    return len(rows)
