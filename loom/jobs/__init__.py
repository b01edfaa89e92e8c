"""Job state machine: submission, leases, fenced completion, finalisation, reconciliation, queries.

Every mutating function takes a Session, keyword-only parameters, and commits its own
transaction (BEGIN IMMEDIATE on SQLite). ``now`` parameters exist so tests can move time.

    from loom import jobs
    jobs.claim_items(session, job_id=..., start=0, end=128, worker_id="w1", limit=32,
                     lease_seconds=120)
"""

from loom.jobs.claims import cancel_remaining, claim_items, complete_items, fail_items, heartbeat
from loom.jobs.control import cancel_job, retry_failed
from loom.jobs.finalize import (
    complete_finalization,
    fire_webhook,
    maybe_finalize,
    webhook_payload,
    write_manifest,
)
from loom.jobs.queries import (
    get_job,
    item_lineage,
    iter_results,
    job_progress,
    list_items,
    list_jobs,
)
from loom.jobs.reconcile import free_expired_leases, reconcile, worker_lost_message
from loom.jobs.submit import publish_pending, request_fingerprint, submit_job
from loom.jobs.types import (
    Chunk,
    ClaimedItem,
    ItemFailure,
    ItemResult,
    JobProgress,
    Page,
    ReconcileReport,
)

__all__ = [
    "Chunk",
    "ClaimedItem",
    "ItemFailure",
    "ItemResult",
    "JobProgress",
    "Page",
    "ReconcileReport",
    "cancel_job",
    "cancel_remaining",
    "claim_items",
    "complete_finalization",
    "complete_items",
    "fail_items",
    "fire_webhook",
    "free_expired_leases",
    "get_job",
    "heartbeat",
    "item_lineage",
    "iter_results",
    "job_progress",
    "list_items",
    "list_jobs",
    "maybe_finalize",
    "publish_pending",
    "reconcile",
    "request_fingerprint",
    "retry_failed",
    "submit_job",
    "webhook_payload",
    "worker_lost_message",
    "write_manifest",
]
