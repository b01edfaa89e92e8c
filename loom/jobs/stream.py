"""A job's live event stream (``GET /v1/jobs/{id}/events``, Server-Sent Events), computed by
short polls so that no database connection is held for the length of a stream.

Events: ``started`` (the job's ``started_at`` is set), ``progress`` (item counts; throttled by the
caller's ``min_interval``), ``item_failed`` (code, message: the persisted ``failed`` events),
``cancelled`` (job-level cancel), ``finished`` (the job is terminal; the last event); a finetune
job adds ``training_started`` (rows, base, the step it resumed from), ``training`` (step, steps,
loss; every few seconds) and ``registered`` (the model version and its held-out scores).

Only event kinds that always stay in the ``events`` table are read (failed, cancelled,
finalized, and the finetune kinds); progress comes from item counts. Each event's id is ``"{cursor}.{started}.{done}"``
(the last persisted event row sent, whether ``started`` was sent, the last progress count), so a
client that reconnects with ``Last-Event-ID`` resumes after what it saw.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from loom.jobs.queries import get_job, job_progress
from loom.jobs.views import job_dict
from loom.models import JOB_TERMINAL, Event, Item

KINDS = ("failed", "cancelled", "finalized", "training_started", "training", "registered")
TERMINAL = {s.value for s in JOB_TERMINAL}


@dataclass
class StreamState:
    cursor: int = 0
    started: bool = False
    done: int = -1
    last_progress: float = float("-inf")  # monotonic seconds of the last progress event
    finished: bool = False

    @property
    def event_id(self) -> str:
        suffix = ".f" if self.finished else ""  # "finished" gets an id of its own
        return f"{self.cursor}.{int(self.started)}.{self.done}{suffix}"

    @classmethod
    def resume(cls, last_event_id: str | None) -> StreamState:
        """The state after the event ``last_event_id`` (a malformed id starts from scratch)."""
        try:
            cursor, started, done = (int(p) for p in (last_event_id or "").split(".")[:3])
        except ValueError:
            return cls()
        return cls(cursor=max(cursor, 0), started=bool(started), done=done)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=lambda v: v.isoformat() + "Z"
                                 if hasattr(v, "isoformat") else str(v)))


def poll(session: Session, *, job_id: str, tenant_id: str | None, state: StreamState,
         now: float, min_interval: float = 0.5, limit: int = 200) -> list[dict[str, Any]]:
    """The events since ``state`` (which is advanced); ``now`` is a monotonic clock reading.
    Raises NotFound for another tenant's job. Each event: ``{"id", "event", "data"}``."""
    out: list[dict[str, Any]] = []

    def emit(name: str, data: dict[str, Any]) -> None:
        out.append({"id": state.event_id, "event": name, "data": data})

    job = get_job(session, job_id=job_id, tenant_id=tenant_id)
    if not state.started and job.started_at is not None:
        state.started = True
        emit("started", {"job_id": job.id, "started_at": job.started_at.isoformat() + "Z"})
    rows = session.execute(
        select(Event.id, Event.kind, Event.item_id, Event.error_code, Event.message, Item.index)
        .outerjoin(Item, Item.id == Event.item_id)
        .where(Event.job_id == job_id, Event.id > state.cursor, Event.kind.in_(KINDS))
        .order_by(Event.id).limit(limit)).all()
    finalized = False
    for row in rows:
        state.cursor = row.id
        if row.kind == "failed" and row.item_id is not None:
            emit("item_failed", {"item_id": row.item_id, "index": row.index,
                                 "code": row.error_code, "message": row.message})
        elif row.kind == "cancelled" and row.item_id is None:
            emit("cancelled", {"job_id": job.id})
        elif row.kind == "finalized":
            finalized = True
        elif row.kind in ("training_started", "training", "registered"):
            emit(row.kind, {"job_id": job.id, **json.loads(row.message or "{}")})
    terminal = finalized or (job.status in TERMINAL and len(rows) < limit)
    progress = job_progress(session, job_id=job_id)
    if progress.done != state.done and (terminal or now - state.last_progress >= min_interval):
        state.done = progress.done
        state.last_progress = now
        emit("progress", {"job_id": job.id, "status": progress.status, "total": progress.total,
                          "done": progress.done, "counts": dict(progress.counts),
                          "progress": progress.done / progress.total if progress.total else 1.0,
                          "items_per_second": progress.items_per_second,
                          "eta_seconds": progress.eta_seconds})
    if terminal:
        job = get_job(session, job_id=job_id, tenant_id=tenant_id)
        if job.status in TERMINAL:
            state.finished = True
            emit("finished", _jsonable(job_dict(job, progress)))
    session.commit()  # end the read transaction: the next poll sees new commits
    return out


def format_sse(event: dict[str, Any]) -> str:
    data = json.dumps(event["data"], separators=(",", ":"), default=str)
    return f"id: {event['id']}\nevent: {event['event']}\ndata: {data}\n\n"
