"""``verify_job``: are a job's outputs still what the database says they are? Optionally repair.

Every succeeded item's output is checked: an image output's object must exist in the store and
its bytes must hash to the recorded sha256; a text output (kept in the row) must hash to its
sha256. With ``repair=True`` exactly the items whose output is missing or corrupt are put back in
the queue for a new attempt: the old output row's lineage is kept as an ``output_lost`` event
(kind, key, sha256s, attempt, worker, model), the row itself makes room for the new attempt's, and
the outbox rows of their chunks are unpublished so the workers get them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from loom.db import begin_write
from loom.errors import InputMissing, InvalidState, StorageError, StoreUnavailable
from loom.jobs.control import _locked_job
from loom.jobs.queries import get_job, succeeded_event
from loom.jobs.types import add_events, status_is
from loom.models import Item, ItemStatus, Job, JobStatus, Outbox, Output, utcnow
from loom.storage import Store, is_outage

PAGE = 1000


@dataclass(frozen=True)
class OutputProblem:
    item_id: int
    index: int
    problem: str  # "missing" | "corrupt"
    storage_key: str | None
    expected_sha256: str | None
    actual_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "index": self.index, "problem": self.problem,
                "storage_key": self.storage_key, "expected_sha256": self.expected_sha256,
                "actual_sha256": self.actual_sha256}


@dataclass
class VerifyReport:
    job_id: str
    checked: int = 0
    problems: list[OutputProblem] = field(default_factory=list)
    requeued: int = 0

    @property
    def missing(self) -> list[OutputProblem]:
        return [p for p in self.problems if p.problem == "missing"]

    @property
    def corrupt(self) -> list[OutputProblem]:
        return [p for p in self.problems if p.problem == "corrupt"]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "checked": self.checked, "ok": self.ok,
                "missing": len(self.missing), "corrupt": len(self.corrupt),
                "requeued": self.requeued, "problems": [p.to_dict() for p in self.problems]}


def _outputs(session: Session, job_id: str) -> Iterator[list[tuple[int, int, Output]]]:
    """Pages of (item id, index, output) of the job's succeeded items, in index order."""
    after = -1
    while True:
        rows = session.execute(
            select(Item.id, Item.index, Output)
            .join(Output, Output.item_id == Item.id)
            .where(Item.job_id == job_id, status_is(ItemStatus.succeeded.value),
                   Item.index > after)
            .order_by(Item.index)
            .limit(PAGE)
        ).all()
        if not rows:
            return
        page = [(int(r[0]), int(r[1]), r[2]) for r in rows]
        for _, _, out in page:
            session.expunge(out)
        yield page
        after = page[-1][1]


def _check(store: Store, item_id: int, index: int, out: Output) -> OutputProblem | None:
    if out.storage_key:
        try:
            data = store.get(out.storage_key)
        except InputMissing:
            return OutputProblem(item_id, index, "missing", out.storage_key, out.sha256)
        except StorageError as exc:
            if is_outage(exc):  # an outage says nothing about the object: stop, do not guess
                raise StoreUnavailable(f"cannot verify {out.storage_key}: {exc.message}") from exc
            return OutputProblem(item_id, index, "missing", out.storage_key, out.sha256)
    else:
        data = (out.text or "").encode("utf-8")
    actual = hashlib.sha256(data).hexdigest()
    if out.sha256 and actual != out.sha256:
        return OutputProblem(item_id, index, "corrupt", out.storage_key, out.sha256, actual)
    return None


def verify_job(
    session: Session,
    *,
    job_id: str,
    store: Store,
    tenant_id: str | None = None,
    repair: bool = False,
    threads: int = 8,
    now: datetime | None = None,
) -> VerifyReport:
    """Check every output of ``job_id``; with ``repair`` requeue exactly the broken items.

    Raises NotFound (unknown job, or another tenant's), StoreUnavailable (the store is down: no
    verdict), InvalidState (repair of a job that is cancelling, cancelled or finalizing)."""
    get_job(session, job_id=job_id, tenant_id=tenant_id)
    session.commit()
    report = VerifyReport(job_id=job_id)
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="loom-verify") as pool:
        for page in _outputs(session, job_id):
            found = pool.map(lambda row: _check(store, *row), page)
            report.checked += len(page)
            report.problems.extend(p for p in found if p is not None)
    session.commit()
    if repair and report.problems:
        report.requeued = requeue_lost(session, job_id=job_id, tenant_id=tenant_id,
                                       problems=report.problems, now=now)
    return report


def requeue_lost(
    session: Session,
    *,
    job_id: str,
    problems: list[OutputProblem],
    tenant_id: str | None = None,
    now: datetime | None = None,
) -> int:
    """Put the items of ``problems`` back in the queue for a new attempt (lineage kept as
    events); the job runs again. Returns how many items were requeued."""
    now = now or utcnow()
    begin_write(session)
    try:
        job = _locked_job(session, job_id=job_id, tenant_id=tenant_id)
        if job.status in (JobStatus.cancelling.value, JobStatus.cancelled.value,
                          JobStatus.finalizing.value):
            raise InvalidState(f"job {job_id} is {job.status}; its outputs cannot be repaired")
        by_item = {p.item_id: p for p in problems}
        rows = session.execute(
            select(Item.id, Item.index, Item.attempts, Output)
            .join(Output, Output.item_id == Item.id)
            .where(Item.job_id == job_id, Item.id.in_(list(by_item)),
                   Item.status == ItemStatus.succeeded.value)
            .with_for_update(of=Item)
        ).all()
        if not rows:
            session.commit()
            return 0
        events: list[dict[str, Any]] = []
        for item_id, _index, attempt, out in rows:
            p = by_item[item_id]
            lineage = {"problem": p.problem, "storage_key": out.storage_key, "kind": out.kind,
                       "sha256": out.sha256, "actual_sha256": p.actual_sha256,
                       "size_bytes": out.size_bytes, "input_sha256": out.input_sha256,
                       "model_name": out.model_name, "model_version": out.model_version,
                       "weights_sha256": out.weights_sha256, "seed": out.seed,
                       "attempt": out.attempt, "worker_id": out.worker_id,
                       "created_at": out.created_at.isoformat() if out.created_at else None}
            # The success this output recorded stays in the item's history as an event row.
            events.append({"job_id": job_id, "item_id": item_id, **succeeded_event(out)})
            events.append({"job_id": job_id, "item_id": item_id, "kind": "output_lost",
                           "attempt": attempt, "worker_id": out.worker_id,
                           "error_code": f"output_{p.problem}",
                           "message": json.dumps(lineage, sort_keys=True), "created_at": now})
        ids = [int(r[0]) for r in rows]
        session.execute(delete(Output).where(Output.item_id.in_(ids))
                        .execution_options(synchronize_session=False))
        # Fresh attempts (the lost output was not the item's fault); numbers keep going up.
        session.execute(
            update(Item).where(Item.id.in_(ids))
            .values(status=ItemStatus.queued.value, attempts_excused=Item.attempts,
                    error_code=None, error_message=None, available_at=None, lease_owner=None,
                    lease_expires_at=None, started_at=None, finished_at=None, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        starts = sorted({int(r[1]) - int(r[1]) % job.chunk_size for r in rows})
        session.execute(
            update(Outbox).where(Outbox.job_id == job_id, Outbox.chunk_start.in_(starts))
            .values(published_at=None).execution_options(synchronize_session=False)
        )
        values: dict[str, object] = {"updated_at": now, "finished_at": None, "results_key": None}
        if job.status != JobStatus.queued.value:
            values["status"] = JobStatus.running.value
        session.execute(update(Job).where(Job.id == job_id).values(**values)
                        .execution_options(synchronize_session=False))
        add_events(session, events)
        session.commit()
        return len(ids)
    except BaseException:
        session.rollback()
        raise
