"""The API's response bodies, built from rows: a job (with its progress, and where it stands
in the queue when asked), an item with its output, an output's URL."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session

from api.deps import Runtime
from api.schemas import ItemError, ItemOut, JobOut, OutputOut
from loom import jobs
from loom.config import Settings
from loom.errors import LoomError
from loom.models import Item, Job, Output


def job_out(session: Session, job: Job, *, settings: Settings | None = None) -> JobOut:
    """``settings``: also where the job stands if it waits (one job's GET, not the lists)."""
    progress = jobs.job_progress(session, job_id=job.id)
    queue = None if settings is None else jobs.queue_place(
        session, job=job, defaults=jobs.Limits.from_settings(settings))
    return JobOut.model_validate(jobs.job_dict(job, progress, queue))


def output_url(rt: Runtime, base_url: str, output: Output) -> str | None:
    if not output.storage_key:
        return None
    try:
        url = rt.store.url(output.storage_key)
    except LoomError:
        url = None
    return url or f"{base_url.rstrip('/')}/v1/outputs/{output.id}/content"


def item_out(rt: Runtime, base_url: str, item: Item, output: Output | None) -> ItemOut:
    out = None
    if output is not None:
        out = OutputOut(
            id=output.id,
            kind=output.kind,
            text=output.text,
            url=output_url(rt, base_url, output),
            content_type=output.content_type,
            sha256=output.sha256,
            size_bytes=output.size_bytes,
        )
    return ItemOut(
        id=item.id,
        index=item.index,
        status=item.status,
        input=item.input or {},
        metadata=item.item_metadata,
        attempts=item.attempts,
        error=ItemError(code=item.error_code, message=item.error_message)
        if item.error_code
        else None,
        output=out,
        cached=output is not None and output.cached_from is not None,
        started_at=item.started_at,
        finished_at=item.finished_at,
    )


def outputs_for(session: Session, items: Sequence[Item]) -> dict[int, Output]:
    """The outputs of a page of items, in one query (not one lazy load per item)."""
    return jobs.outputs_for_items(session, item_ids=[item.id for item in items])
