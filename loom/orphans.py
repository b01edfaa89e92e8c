"""The orphan sweep: objects under a job's folder (``<tenant>/jobs/<job_id>/``) whose job row does
not exist, older than a grace period, are deleted.

Inline inputs are stored before their job row is committed (so that no worker can see an item
whose input is not there yet). A request that dies between the two, or loses a race for an
Idempotency-Key and cannot clean up after itself, leaves such a folder; nothing else ever
reads it. The grace period must exceed the longest submission (store + commit), so that a job
being submitted right now is never swept; an hour is plenty.

Cheap on a big store: it lists folder names (S3 ``Delimiter``), not objects, except inside the
orphaned folders themselves. The worker's reconciler thread calls it every
``LOOM_ORPHAN_SWEEP_INTERVAL_SECONDS``.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

from sqlalchemy.orm import Session

from loom import jobs
from loom.storage import Store

log = logging.getLogger(__name__)


def sweep_orphans(session: Session, store: Store, *, grace_seconds: float,
                  now: datetime | None = None) -> int:
    """Delete the objects of job folders that have no job row and were last written more than
    ``grace_seconds`` ago. Returns how many objects were deleted."""
    now = now or datetime.now(timezone.utc)
    if now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    cutoff = now - timedelta(seconds=grace_seconds)
    removed = 0
    for tenant in store.list_dirs(""):
        # The read transaction ends inside, before the slow store calls below.
        orphans = jobs.orphaned_job_ids(session, job_ids=store.list_dirs(f"{tenant}/jobs/"))
        for job_id in orphans:
            for key, modified in list(store.list_objects(f"{tenant}/jobs/{job_id}/")):
                if modified <= cutoff:
                    store.delete(key)
                    removed += 1
    if removed:
        log.info("orphan sweep: deleted %d objects of jobs that do not exist", removed)
    return removed
