"""User-initiated state changes of a whole job: cancel and retry-failed."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from loom.db import begin_write
from loom.errors import InvalidState, NotFound
from loom.jobs.finalize import maybe_finalize
from loom.jobs.queries import get_job
from loom.jobs.types import OPEN_ITEM_PHASE, add_events
from loom.models import Item, ItemStatus, Job, JobStatus, Outbox, utcnow
from loom.storage import Store


def _locked_job(session: Session, *, job_id: str, tenant_id: str | None) -> Job:
    job = session.scalar(
        select(Job).where(Job.id == job_id).with_for_update().execution_options(
            populate_existing=True)
    )
    if job is None or (tenant_id is not None and job.tenant_id != tenant_id):
        raise NotFound(f"no job {job_id}")
    return job


def cancel_job(
    session: Session,
    *,
    job_id: str,
    tenant_id: str | None = None,
    store: Store | None = None,
    on_finalized: Callable[[Job], None] | None = None,
    now: datetime | None = None,
) -> Job:
    """Cancel: queued items are cancelled at once; the job turns ``cancelling`` until running
    items are finished or cancelled by their workers, then ``cancelled`` (via finalisation).
    Cancelling a job that is already cancelling/cancelled is a no-op."""
    now = now or utcnow()
    begin_write(session)
    try:
        job = _locked_job(session, job_id=job_id, tenant_id=tenant_id)
        if job.status in (JobStatus.cancelling.value, JobStatus.cancelled.value):
            session.commit()
            return job
        if job.status not in (JobStatus.queued.value, JobStatus.running.value):
            raise InvalidState(
                f"job {job_id} is {job.status}; only unfinished jobs can be cancelled")
        n = session.execute(
            update(Item)
            .where(Item.job_id == job_id, OPEN_ITEM_PHASE, Item.status == ItemStatus.queued.value)
            .values(status=ItemStatus.cancelled.value, error_code="cancelled",
                    error_message="job cancelled", finished_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        ).rowcount  # type: ignore[attr-defined]
        session.execute(
            update(Job).where(Job.id == job_id)
            .values(status=JobStatus.cancelling.value, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        # One job-level event, not one per item: cancelling 100k items stays one statement.
        add_events(session, [{"job_id": job_id, "kind": "cancelled",
                              "message": f"cancel requested; {n} queued items cancelled",
                              "created_at": now}])
        session.commit()
    except BaseException:
        session.rollback()
        raise
    # Nothing running -> this finalises at once (status cancelled); otherwise the last worker
    # to finish or cancel its items does.
    maybe_finalize(session, job_id=job_id, store=store, on_finalized=on_finalized, now=now)
    return get_job(session, job_id=job_id)


def retry_failed(
    session: Session, *, job_id: str, tenant_id: str | None = None, now: datetime | None = None
) -> int:
    """Put a job's failed items back in the queue with fresh attempts; returns how many.

    The job goes back to ``running`` and the outbox rows of the affected chunks are marked
    unpublished, so ``publish_pending`` (or the reconciler) sends them to the workers.
    """
    now = now or utcnow()
    begin_write(session)
    try:
        job = _locked_job(session, job_id=job_id, tenant_id=tenant_id)
        if job.status in (JobStatus.cancelling.value, JobStatus.cancelled.value,
                          JobStatus.finalizing.value):
            raise InvalidState(f"job {job_id} is {job.status}; failed items cannot be retried")
        indexes = list(session.scalars(
            update(Item)
            .where(Item.job_id == job_id, Item.phase == ItemStatus.failed.value,
                   Item.status == ItemStatus.failed.value)
            # Fresh attempts, but attempt NUMBERS go on: the spent ones are excused, so a stale
            # result pinned to an old attempt number can never match the new attempt.
            .values(status=ItemStatus.queued.value, attempts_excused=Item.attempts,
                    error_code=None,
                    error_message=None, available_at=None, lease_owner=None,
                    lease_expires_at=None, started_at=None, finished_at=None, updated_at=now)
            .returning(Item.index)
            .execution_options(synchronize_session=False)
        ))
        if not indexes:
            session.commit()
            return 0
        starts = sorted({i - i % job.chunk_size for i in indexes})
        for lo in range(0, len(starts), 1000):
            session.execute(
                update(Outbox)
                .where(Outbox.job_id == job_id, Outbox.chunk_start.in_(starts[lo : lo + 1000]))
                .values(published_at=None)
                .execution_options(synchronize_session=False)
            )
        values: dict[str, object] = {"updated_at": now, "finished_at": None, "results_key": None}
        if job.status != JobStatus.queued.value:
            values["status"] = JobStatus.running.value
        session.execute(
            update(Job).where(Job.id == job_id).values(**values)
            .execution_options(synchronize_session=False)
        )
        add_events(session, [{"job_id": job_id, "kind": "retry_scheduled",
                              "message": f"retry requested for {len(indexes)} failed items",
                              "created_at": now}])
        session.commit()
        return len(indexes)
    except BaseException:
        session.rollback()
        raise
