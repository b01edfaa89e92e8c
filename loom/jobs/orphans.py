"""Orphaned job folders: the job ids, among the folders a store holds under ``<tenant>/jobs/``,
that have no job row. The orphan sweep (loom/orphans.py) lists the folders and deletes what
these ids leave behind; only the question to the database lives here.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from loom.models import Job

# Ids per IN (...) list: a tenant may have tens of thousands of job folders, more than a
# database accepts as bound parameters in one statement.
_IN_BATCH = 500


def orphaned_job_ids(session: Session, *, job_ids: Sequence[str]) -> list[str]:
    """The ids in ``job_ids`` that have no job row, in their given order. Ends its read
    transaction, so that the caller's slow store calls hold no snapshot open."""
    known: set[str] = set()
    for i in range(0, len(job_ids), _IN_BATCH):
        batch = list(job_ids[i:i + _IN_BATCH])
        known.update(session.scalars(select(Job.id).where(Job.id.in_(batch))))
    session.rollback()
    return [job_id for job_id in job_ids if job_id not in known]
