"""Reads for the job page (api/routes/ui.py): throughput over time, stage timings, failures
grouped by error code, a sample of results, item thumbnails' storage keys.

All tenant-scoped like ``get_job`` (another tenant's job or item is NotFound). Aggregates run in
SQL where they grow with the job (throughput buckets, failure groups); stage timings average a
bounded sample of the newest outputs' ``timings`` JSON (portable across SQLite and PostgreSQL).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Float, cast, func, select
from sqlalchemy.orm import Session

from loom.errors import NotFound
from loom.jobs.queries import get_job, job_progress
from loom.jobs.types import status_is
from loom.jobs.views import job_dict, result_row
from loom.models import Item, ItemStatus, Job, Output

# Page stage -> the key the worker writes into Output.timings ("read" is the fetch or store read;
# "complete" is only present where the worker records it).
STAGES = {"read": "fetch_ms", "decode": "decode_ms", "infer": "infer_ms", "upload": "upload_ms",
          "complete": "complete_ms"}
TIMING_SAMPLE = 2000


def _epoch(session: Session, column: Any) -> Any:
    """Seconds since 1970 of a naive-UTC DateTime column, in SQL, on either database."""
    if session.get_bind().dialect.name == "sqlite":
        return (func.julianday(column) - 2440587.5) * 86400.0
    return cast(func.extract("epoch", column), Float)


def jobs_overview(session: Session, *, tenant_id: str, status: str | None = None,
                  task: str | None = None, limit: int = 50,
                  cursor: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """The jobs list: each job as ``job_dict`` with its progress (counts, items/s)."""
    from loom.jobs.queries import list_jobs

    page = list_jobs(session, tenant_id=tenant_id, status=status, limit=limit, cursor=cursor)
    rows = [job_dict(j, job_progress(session, job_id=j.id)) for j in page.items
            if task is None or j.task == task]
    session.commit()
    return rows, page.next_cursor


def throughput(session: Session, *, job_id: str, tenant_id: str | None = None,
               buckets: int = 40) -> list[dict[str, float]]:
    """Items/s over time: ``[{"t": seconds since the job started, "rate": items/s}]``, one
    per bucket of equal width between the job's start and its last finished item."""
    job = get_job(session, job_id=job_id, tenant_id=tenant_id)
    finished = (Item.job_id == job_id, Item.status == ItemStatus.succeeded.value,
                Item.finished_at.is_not(None))
    first, last = session.execute(
        select(func.min(Item.finished_at), func.max(Item.finished_at)).where(*finished)).one()
    begin = job.started_at or first
    if begin is None or last is None:
        session.commit()
        return []
    n_ok = session.scalar(select(func.count()).where(*finished)) or 0
    # Items finish a batch at a time: a bucket should hold several batches or the chart is spikes.
    buckets = max(4, min(buckets, n_ok // 8))
    span = max((last - begin).total_seconds(), 1e-3)
    width = span / buckets
    offset = _epoch(session, Item.finished_at) - _naive_epoch(begin)
    bucket = func.floor(offset / width)
    counts = dict(session.execute(
        select(bucket, func.count()).where(*finished).group_by(bucket)).all())
    session.commit()
    out = []
    for i in range(buckets):
        n = sum(v for k, v in counts.items() if k is not None and min(int(k), buckets - 1) == i)
        out.append({"t": round((i + 1) * width, 3), "rate": round(n / width, 3)})
    return out


def _naive_epoch(value: datetime) -> float:
    return (value - datetime(1970, 1, 1)).total_seconds()


def stage_timings(session: Session, *, job_id: str, tenant_id: str | None = None,
                  ) -> dict[str, float]:
    """Mean milliseconds per item of each stage (read, decode, infer, upload, complete) that the
    outputs record, from the newest ``TIMING_SAMPLE`` outputs. Batched stages (infer) are
    divided by batch size."""
    get_job(session, job_id=job_id, tenant_id=tenant_id)
    rows = session.scalars(select(Output.timings).where(Output.job_id == job_id)
                           .order_by(Output.id.desc()).limit(TIMING_SAMPLE)).all()
    session.commit()
    sums = {s: 0.0 for s in STAGES}
    present: set[str] = set()
    n = 0
    for timings in rows:
        if not timings:
            continue
        n += 1
        batch = float(timings.get("infer_batch_size") or 1.0) or 1.0
        for stage, key in STAGES.items():
            if key in timings:
                present.add(stage)
            ms = float(timings.get(key) or 0.0)
            sums[stage] += ms / batch if stage == "infer" else ms
    return {s: round(v / n, 3) for s, v in sums.items() if s in present} if n else {}


def failures(session: Session, *, job_id: str, tenant_id: str | None = None,
             examples: int = 3) -> list[dict[str, Any]]:
    """Failed items grouped by error code, most frequent first, with a few example items."""
    get_job(session, job_id=job_id, tenant_id=tenant_id)
    failed = (Item.job_id == job_id, status_is(ItemStatus.failed.value))
    groups = session.execute(
        select(Item.error_code, func.count()).where(*failed).group_by(Item.error_code)
        .order_by(func.count().desc()).limit(20)).all()
    out = []
    for code, n in groups:
        rows = session.execute(
            select(Item.id, Item.index, Item.error_message, Item.item_metadata)
            .where(*failed, Item.error_code == code).order_by(Item.index).limit(examples)).all()
        out.append({"code": code or "unknown", "count": n, "examples": [
            {"item_id": r.id, "index": r.index, "message": r.error_message,
             "metadata": r.item_metadata} for r in rows]})
    session.commit()
    return out


def samples(session: Session, *, job_id: str, tenant_id: str | None = None,
            limit: int = 12) -> list[dict[str, Any]]:
    """The first ``limit`` succeeded items as result rows (input, output, lineage)."""
    get_job(session, job_id=job_id, tenant_id=tenant_id)
    rows = session.execute(
        select(Item, Output).join(Output, Output.item_id == Item.id)
        .where(Item.job_id == job_id, Item.status == ItemStatus.succeeded.value)
        .order_by(Item.index).limit(limit)).all()
    session.commit()
    return [result_row(item, output) for item, output in rows]


def item_image_key(session: Session, *, item_id: int, tenant_id: str | None,
                   which: str) -> tuple[str, str | None]:
    """(storage key, content type) of an item's stored input image (``which="input"``) or
    image output (``"output"``), tenant-scoped; NotFound when there is none."""
    row = session.execute(
        select(Item, Job.tenant_id).join(Job, Job.id == Item.job_id).where(Item.id == item_id)
    ).first()
    session.commit()
    if row is None or (tenant_id is not None and row[1] != tenant_id):
        raise NotFound(f"no item {item_id}")
    item: Item = row[0]
    if which == "input":
        key = (item.input or {}).get("image_key")
        if key:
            return key, None
    else:
        output = session.scalar(select(Output).where(Output.item_id == item_id))
        session.commit()
        if output is not None and output.storage_key:
            return output.storage_key, output.content_type
    raise NotFound(f"item {item_id} has no stored {which} image")


def item_job_id(session: Session, *, item_id: int, tenant_id: str | None) -> str:
    row = session.execute(select(Item.job_id, Job.tenant_id).join(Job, Job.id == Item.job_id)
                          .where(Item.id == item_id)).first()
    session.commit()
    if row is None or (tenant_id is not None and row[1] != tenant_id):
        raise NotFound(f"no item {item_id}")
    return str(row[0])
