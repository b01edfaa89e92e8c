"""Shared helpers for the loom.jobs tests (claims with the test lease, a text result)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from loom import jobs
from loom.jobs import ItemResult
from loom.models import Event, Item, Job

LEASE = 60.0


def claim(session: Session, job: Job, worker: str, *, start: int = 0, end: int | None = None,
          limit: int = 100, now: Any = None) -> list[jobs.ClaimedItem]:
    return jobs.claim_items(session, job_id=job.id, start=start,
                            end=job.item_count if end is None else end, worker_id=worker,
                            limit=limit, lease_seconds=LEASE, now=now)


def ok(c: jobs.ClaimedItem, text: str = "a caption") -> ItemResult:
    return ItemResult(c.id, "text", text=text, model_version="1", weights_sha256="ab" * 32,
                      timings={"model": 0.01}, attempt=c.attempts)


def statuses(session: Session, job: Job) -> list[str]:
    session.commit()
    return list(session.scalars(select(Item.status).where(Item.job_id == job.id)
                                .order_by(Item.index)))


def events(session: Session, job: Job, kind: str) -> int:
    session.commit()
    return int(session.scalar(select(func.count()).where(Event.job_id == job.id,
                                                         Event.kind == kind)) or 0)
