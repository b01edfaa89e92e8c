"""Usage metering: per tenant, per model (the job's ``model_name``), per UTC day: items by status,
model-seconds and bytes stored. Read by ``GET /v1/usage``, ``loom usage`` and /metrics.

What an item counts toward, and when:

- **Day**: the UTC date of the item's ``finished_at`` for a terminal item (succeeded, failed,
  cancelled). An item still queued or running is counted *now* (today's row): it is work in
  flight, so a past day's numbers only change when a failed item is retried.
- **Model-seconds**: the model's own time for the item, from its output's lineage timings: a
  batch shares one model call, whose time every output of the batch records as ``infer_ms``
  with the batch's size as ``infer_batch_size``, so an item's share is ``infer_ms /
  infer_batch_size``; a finetune item adds its ``train_ms``. Summing ``finished_at -
  started_at`` instead would count one batch's wall time once per item (and add the input
  fetch, decode and upload time). An output reused from the result cache records no model call
  and costs 0; an item without an output (failed, cancelled, open) costs 0.
- **Bytes stored**: ``size_bytes`` of the item's output (a PNG, an embedding ``.npy``, a
  fine-tuned model's weights in the object store; a text output's UTF-8 bytes in the database),
  unless the output is a cache reuse (it points at an object stored already). Inputs, uploaded
  files and results manifests are not counted: their sizes are not recorded per item.

Both databases: the day is ``date()`` of the timestamp on SQLite and ``CAST(... AS DATE)`` on
PostgreSQL; the JSON timings are read with SQLAlchemy's portable JSON accessors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Any

from sqlalchemy import Date, Float, and_, case, cast, func, or_, select
from sqlalchemy.orm import Session

from loom.errors import InvalidRequest
from loom.models import Item, ItemStatus, Job, Output, Tenant, utcnow

DEFAULT_DAYS = 30  # GET /v1/usage and `loom usage` without --since: the last 30 days
MAX_DAYS = 366  # the longest range one call reads
FIRST_DAY, LAST_DAY = date(1970, 1, 1), date(9999, 12, 30)  # days a range may name
# Jobs that finished this long before the range (or were created this long after it) are not
# read at all: no item of theirs can fall inside it. The margin covers clock skew between the
# API (job timestamps) and the workers (item timestamps).
JOB_MARGIN = timedelta(days=1)
OPEN = (ItemStatus.queued.value, ItemStatus.running.value)
STATUSES = tuple(s.value for s in ItemStatus)


def _no_items() -> dict[str, int]:
    return dict.fromkeys(STATUSES, 0)


@dataclass(frozen=True)
class UsageRow:
    """One tenant's use of one model on one UTC day."""

    day: date
    tenant_id: str
    tenant_name: str
    model: str
    items: dict[str, int] = field(default_factory=_no_items)  # every item status, 0 if none
    model_seconds: float = 0.0
    bytes_stored: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The row as ``GET /v1/usage`` shows it (the tenant is the caller's: not repeated)."""
        return {"day": self.day.isoformat(), "model": self.model, "items": dict(self.items),
                "model_seconds": round(self.model_seconds, 3), "bytes_stored": self.bytes_stored}


@dataclass(frozen=True)
class UsageTotal:
    """One tenant's use of one model over a window (the /metrics series)."""

    tenant_id: str
    tenant_name: str
    model: str
    items: dict[str, int] = field(default_factory=_no_items)
    model_seconds: float = 0.0
    bytes_stored: int = 0


def usage_range(*, since: date | None, until: date | None,
                today: date | None = None) -> tuple[date, date]:
    """The (since, until) days a usage read covers, both inclusive: ``until`` defaults to today
    (UTC), ``since`` to the ``DEFAULT_DAYS`` days ending at ``until``. InvalidRequest when since
    is after until, the range is longer than ``MAX_DAYS``, or a day lies outside
    ``FIRST_DAY``..``LAST_DAY``."""
    until = until or today or utcnow().date()
    for name, day in (("since", since), ("until", until)):
        if day is not None and not FIRST_DAY <= day <= LAST_DAY:
            raise InvalidRequest(f"{name} ({day.isoformat()}) is not between "
                                 f"{FIRST_DAY.isoformat()} and {LAST_DAY.isoformat()}")
    since = since or max(until - timedelta(days=DEFAULT_DAYS - 1), FIRST_DAY)
    if since > until:
        raise InvalidRequest(f"since ({since.isoformat()}) is after until ({until.isoformat()})")
    if (until - since).days + 1 > MAX_DAYS:
        raise InvalidRequest(f"since..until spans {(until - since).days + 1} days; "
                             f"at most {MAX_DAYS} in one call")
    return since, until


def _per_item(*, start: datetime, end: datetime, now: datetime, tenant_id: str | None,
              model: str | None) -> Any:
    """One row per item counted in [start, end): when it counts, its tenant, model, status,
    model-seconds and bytes stored (a subquery, so that the outer GROUP BY names plain columns
    on PostgreSQL)."""
    counted_at = case(
        (Item.status.in_(OPEN), now),
        else_=func.coalesce(Item.finished_at, Item.updated_at),
    )
    timings = Output.timings
    infer_ms = func.coalesce(timings["infer_ms"].as_float(), 0.0)
    batch = func.coalesce(func.nullif(timings["infer_batch_size"].as_float(), 0.0), 1.0)
    train_ms = func.coalesce(timings["train_ms"].as_float(), 0.0)
    seconds = cast((infer_ms / batch + train_ms) / 1000.0, Float)
    stored = case((Output.cached_from.is_(None), Output.size_bytes), else_=0)
    stmt = (
        select(counted_at.label("at"), Job.tenant_id.label("tenant_id"),
               Job.model_name.label("model"), Item.status.label("status"),
               seconds.label("seconds"), stored.label("stored"))
        .select_from(Item)
        .join(Job, Job.id == Item.job_id)
        .outerjoin(Output, Output.item_id == Item.id)
        .where(
            Job.created_at < end + JOB_MARGIN,
            or_(Job.finished_at.is_(None), Job.finished_at >= start - JOB_MARGIN),
            and_(counted_at >= start, counted_at < end),
        )
    )
    if tenant_id is not None:
        stmt = stmt.where(Job.tenant_id == tenant_id)
    if model is not None:
        stmt = stmt.where(Job.model_name == model)
    return stmt.subquery()


def _day(session: Session, column: Any) -> Any:
    if session.get_bind().dialect.name == "sqlite":
        return func.date(column)  # 'YYYY-MM-DD' of the stored 'YYYY-MM-DD HH:MM:SS...'
    return cast(column, Date)


def _as_date(value: Any) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value))


def _grouped(session: Session, rows: Any,
             by: list[Any]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """``by`` values -> {tenant_name, items, model_seconds, bytes_stored}: one SQL row per status
    of each group, folded into one entry."""
    found: dict[tuple[Any, ...], dict[str, Any]] = {}
    for *key, tenant_name, status, n, seconds, stored in session.execute(
        select(*by, Tenant.name, rows.c.status, func.count(),
               func.coalesce(func.sum(rows.c.seconds), 0.0),
               func.coalesce(func.sum(rows.c.stored), 0))
        .join_from(rows, Tenant, Tenant.id == rows.c.tenant_id)
        .group_by(*by, Tenant.name, rows.c.status)
    ):
        entry = found.setdefault(tuple(key), {"tenant_name": tenant_name, "items": _no_items(),
                                              "model_seconds": 0.0, "bytes_stored": 0})
        entry["items"][status] = entry["items"].get(status, 0) + int(n)
        entry["model_seconds"] += float(seconds or 0.0)
        entry["bytes_stored"] += int(stored or 0)
    session.commit()  # end the read
    return found


def usage(
    session: Session,
    *,
    tenant_id: str | None,
    since: date,
    until: date,
    model: str | None = None,
    now: datetime | None = None,
) -> list[UsageRow]:
    """Usage per (UTC day, tenant, model) for the days ``since``..``until`` (inclusive), ordered
    by day, tenant name, model; ``tenant_id`` None: every tenant. Only days and models with at
    least one item have a row. See the module's docstring for what counts and when."""
    now = now or utcnow()
    start = datetime.combine(since, time.min)
    end = datetime.combine(until + timedelta(days=1), time.min)
    rows = _per_item(start=start, end=end, now=now, tenant_id=tenant_id, model=model)
    found = _grouped(session, rows, [_day(session, rows.c.at), rows.c.tenant_id, rows.c.model])
    out = [UsageRow(day=_as_date(d), tenant_id=tid, model=m, **entry)
           for (d, tid, m), entry in found.items()]
    return sorted(out, key=lambda r: (r.day, r.tenant_name, r.model))


def recent_usage(
    session: Session, *, seconds: float, now: datetime | None = None,
) -> list[UsageTotal]:
    """Usage per (tenant, model) over the last ``seconds`` (what /metrics exports): terminal
    items that finished in that window, and every item queued or running now. Ordered by
    tenant name, model."""
    now = now or utcnow()
    start = now - timedelta(seconds=seconds)
    # The open items count at ``now``: the window's end lies just after it.
    rows = _per_item(start=start, end=now + timedelta(microseconds=1), now=now,
                     tenant_id=None, model=None)
    found = _grouped(session, rows, [rows.c.tenant_id, rows.c.model])
    out = [UsageTotal(tenant_id=tid, model=m, **entry) for (tid, m), entry in found.items()]
    return sorted(out, key=lambda r: (r.tenant_name, r.model))


def usage_report(
    session: Session,
    *,
    tenant_id: str,
    since: date | None = None,
    until: date | None = None,
    model: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """One tenant's usage as ``GET /v1/usage`` answers it (``loom usage --json`` embedded prints
    the same): ``{tenant: {id, name}, since, until, model, days: [UsageRow.to_dict()], total:
    {items, model_seconds, bytes_stored}}``. Missing dates default as in ``usage_range``."""
    now = now or utcnow()
    since, until = usage_range(since=since, until=until, today=now.date())
    rows = usage(session, tenant_id=tenant_id, since=since, until=until, model=model, now=now)
    name = session.scalar(select(Tenant.name).where(Tenant.id == tenant_id))
    session.commit()
    items = _no_items()
    for r in rows:
        for status, n in r.items.items():
            items[status] = items.get(status, 0) + n
    return {
        "tenant": {"id": tenant_id, "name": name or ""},
        "since": since.isoformat(), "until": until.isoformat(), "model": model,
        "days": [r.to_dict() for r in rows],
        "total": {"items": items,
                  "model_seconds": round(float(sum(r.model_seconds for r in rows)), 3),
                  "bytes_stored": sum(r.bytes_stored for r in rows)},
    }
