"""Fleet-wide numbers for /metrics, read from the database at scrape time (every API replica
reports the same)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Float, case, cast, func, select
from sqlalchemy.orm import Session

from loom.models import Item, ItemStatus, Job, Output


def job_status_counts(session: Session) -> dict[str, int]:
    return {s: int(n) for s, n in session.execute(
        select(Job.status, func.count()).group_by(Job.status)).all()}


def item_status_counts(session: Session) -> dict[str, int]:
    return {s: int(n) for s, n in session.execute(
        select(Item.status, func.count()).group_by(Item.status)).all()}


def _duration_seconds(dialect: str) -> object:
    if dialect == "sqlite":
        return (func.julianday(Item.finished_at) - func.julianday(Item.started_at)) * 86400.0
    return func.extract("epoch", Item.finished_at - Item.started_at)


def item_latency(
    session: Session, *, buckets: Sequence[float]
) -> tuple[int, float, list[int]]:
    """(count, total seconds, cumulative count per bucket bound) of finished items' run times."""
    dialect = session.get_bind().dialect.name
    d = cast(_duration_seconds(dialect), Float)
    cols = [func.sum(case((d <= b, 1), else_=0)) for b in buckets]
    row = session.execute(
        select(func.count(), func.coalesce(func.sum(d), 0.0), *cols).where(
            Item.status.in_([ItemStatus.succeeded.value, ItemStatus.failed.value]),
            Item.started_at.is_not(None),
            Item.finished_at.is_not(None),
        )
    ).one()
    return int(row[0] or 0), float(row[1] or 0.0), [int(v or 0) for v in row[2:]]


def outputs_per_worker(session: Session, *, since: datetime) -> dict[str, int]:
    return {w: int(n) for w, n in session.execute(
        select(Output.worker_id, func.count())
        .where(Output.created_at >= since)
        .group_by(Output.worker_id))}
