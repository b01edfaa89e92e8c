"""Job state machine: submission, leases, fenced completion, finalisation, reconciliation, queries.

Every mutating function takes a Session, keyword-only parameters, and commits its own
transaction (BEGIN IMMEDIATE on SQLite). ``now`` parameters exist so tests can move time.

    from loom import jobs
    jobs.claim_items(session, job_id=..., start=0, end=128, worker_id="w1", limit=32,
                     lease_seconds=120)
"""

from loom.jobs.aliases import add_alias, alias_ref, list_aliases, remove_alias, resolve_alias
from loom.jobs.batches import (
    add_batch_job,
    create_batch,
    get_batch,
    item_counts,
    job_statuses,
    list_batches,
    open_batch_ids,
    update_batch,
)
from loom.jobs.cache import cache_key, cached_outputs, job_uses_cache
from loom.jobs.catalog import model_versions, record_model_version
from loom.jobs.chunks import (
    SUSPECT_CODES,
    ClaimHead,
    claim_head,
    job_chunks,
    job_head,
    job_item_count,
    job_max_attempts,
    job_status,
    suspect_ids,
    suspect_indexes,
)
from loom.jobs.claims import cancel_remaining, claim_items, complete_items, fail_items, heartbeat
from loom.jobs.control import cancel_job, retry_failed
from loom.jobs.deliveries import (
    DueDelivery,
    claim_due_deliveries,
    delivery_backoff,
    enqueue_delivery,
    enqueue_progress_deliveries,
    job_deliveries,
    record_delivery_attempt,
)
from loom.jobs.events import TrainingEvent, training_events
from loom.jobs.fill import claim_fill
from loom.jobs.finalize import (
    complete_finalization,
    complete_finalizations,
    finalize_jobs,
    maybe_finalize,
    write_manifest,
)
from loom.jobs.leases import end_leases, release_leases
from loom.jobs.limits import Limits, TenantLimits, list_limits, set_limits
from loom.jobs.shares import queue_place
from loom.jobs.orphans import orphaned_job_ids
from loom.jobs.outage import ping, release_items
from loom.jobs.queries import (
    get_job,
    get_output,
    item_lineage,
    items_metadata,
    iter_results,
    job_progress,
    list_items,
    list_jobs,
    outputs_for_items,
    resolve_job_id,
)
from loom.jobs.reconcile import free_expired_leases, reconcile, worker_lost_message
from loom.jobs.registry import (
    Trained,
    model_dict,
    register_model,
    registered_caps,
    registered_for_job,
    registered_models,
    resolve_model,
)
from loom.jobs.stats import (
    item_latency,
    item_status_counts,
    job_status_counts,
    outputs_per_worker,
)
from loom.jobs.submit import (
    existing_for_key,
    publish_pending,
    request_fingerprint,
    request_hash,
    submit_job,
)
from loom.jobs.types import (
    Chunk,
    ClaimedItem,
    ItemFailure,
    ItemResult,
    JobProgress,
    Page,
    ReconcileReport,
)
from loom.jobs.usage import UsageRow, UsageTotal, recent_usage, usage, usage_range, usage_report
from loom.jobs.verify import OutputProblem, VerifyReport, requeue_lost, verify_job
from loom.jobs.views import job_dict, job_ref, lineage_dict, result_row

__all__ = [
    "queue_place",
    "Limits",
    "TenantLimits",
    "list_limits",
    "set_limits",
    "add_batch_job",
    "create_batch",
    "get_batch",
    "item_counts",
    "job_statuses",
    "list_batches",
    "open_batch_ids",
    "update_batch",
    "add_alias",
    "alias_ref",
    "list_aliases",
    "remove_alias",
    "resolve_alias",
    "Chunk",
    "ClaimHead",
    "ClaimedItem",
    "DueDelivery",
    "ItemFailure",
    "ItemResult",
    "JobProgress",
    "OutputProblem",
    "Page",
    "ReconcileReport",
    "SUSPECT_CODES",
    "Trained",
    "TrainingEvent",
    "UsageRow",
    "UsageTotal",
    "VerifyReport",
    "cache_key",
    "cached_outputs",
    "cancel_job",
    "cancel_remaining",
    "claim_due_deliveries",
    "claim_fill",
    "claim_head",
    "claim_items",
    "complete_finalization",
    "complete_finalizations",
    "complete_items",
    "delivery_backoff",
    "enqueue_delivery",
    "enqueue_progress_deliveries",
    "existing_for_key",
    "fail_items",
    "free_expired_leases",
    "get_job",
    "get_output",
    "heartbeat",
    "item_latency",
    "item_lineage",
    "items_metadata",
    "item_status_counts",
    "iter_results",
    "job_chunks",
    "job_deliveries",
    "job_dict",
    "job_head",
    "job_item_count",
    "job_max_attempts",
    "job_progress",
    "job_ref",
    "job_status",
    "job_uses_cache",
    "job_status_counts",
    "lineage_dict",
    "list_items",
    "list_jobs",
    "finalize_jobs",
    "maybe_finalize",
    "model_dict",
    "model_versions",
    "orphaned_job_ids",
    "outputs_for_items",
    "outputs_per_worker",
    "ping",
    "publish_pending",
    "reconcile",
    "record_delivery_attempt",
    "record_model_version",
    "register_model",
    "registered_caps",
    "registered_for_job",
    "registered_models",
    "end_leases",
    "release_leases",
    "release_items",
    "request_fingerprint",
    "request_hash",
    "requeue_lost",
    "resolve_job_id",
    "resolve_model",
    "result_row",
    "retry_failed",
    "submit_job",
    "suspect_ids",
    "suspect_indexes",
    "training_events",
    "recent_usage",
    "usage",
    "usage_range",
    "usage_report",
    "verify_job",
    "worker_lost_message",
    "write_manifest",
]
