"""Reading a finetune job's training events back as they are written (``loom finetune`` prints
them while the engine trains). The worker writes them with ``add_events`` (loom/jobs/types.py).
"""

from __future__ import annotations

from typing import NamedTuple

from sqlalchemy import select
from sqlalchemy.orm import Session

from loom.models import Event

# The kinds worker/finetune.py records: the run's start, each logged step, the registration.
TRAINING_EVENT_KINDS = ("training_started", "training", "registered")


class TrainingEvent(NamedTuple):
    id: int
    kind: str
    message: str | None  # JSON: the step's numbers, or the run's or registration's details


def training_events(session: Session, *, job_id: str, after_id: int = 0) -> list[TrainingEvent]:
    """The job's training events with an id above ``after_id`` (the last one already seen),
    oldest first: polled, each call returns only what is new."""
    rows = session.execute(
        select(Event.id, Event.kind, Event.message)
        .where(Event.job_id == job_id, Event.id > after_id,
               Event.kind.in_(TRAINING_EVENT_KINDS))
        .order_by(Event.id)).all()
    return [TrainingEvent(r.id, r.kind, r.message) for r in rows]
