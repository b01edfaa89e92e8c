"""The one shape of a job and the one shape of a result row, shared by the API, the CLI, the
exports, the webhook and lineage. Plain dicts of JSON-friendly values (datetimes stay datetimes;
the API's pydantic models and ``json.dumps(default=str)`` both take them)."""

from __future__ import annotations

from typing import Any

from loom.jobs.types import JobProgress
from loom.models import Item, Job, Output


def job_dict(job: Job, progress: JobProgress | None = None,
             queue: dict[str, Any] | None = None) -> dict[str, Any]:
    """A job with its counts and progress (``progress`` from ``job_progress``; without it the
    counts are empty and the rate unknown), and where it waits (``queue_place``)."""
    counts = {k: int(v) for k, v in dict(progress.counts).items()} if progress else {}
    done = int(progress.done) if progress else 0
    total = job.item_count
    return {
        "id": job.id,
        "task": job.task,
        "model": job.model_name,
        "status": job.status,
        "priority": job.priority,
        "params": job.params or {},
        "metadata": job.job_metadata or None,
        "parent_job_id": job.parent_job_id,
        "webhook_url": job.webhook_url,
        "cache": job.use_cache,
        "item_count": total,
        "counts": counts,
        "done": done,
        "progress": (done / total) if total else 1.0,
        "items_per_second": progress.items_per_second if progress else None,
        "eta_seconds": progress.eta_seconds if progress else None,
        "queue": queue,
        "error": {"code": job.error_code, "message": job.error_message}
        if job.error_code else None,
        "results_key": job.results_key,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "updated_at": job.updated_at,
    }


def job_ref(job: Job) -> dict[str, Any]:
    """A job as lineage names it (the parent chain): what ran, with what, when."""
    return {"id": job.id, "task": job.task, "model_name": job.model_name, "status": job.status,
            "params": job.params, "parent_job_id": job.parent_job_id,
            "created_at": job.created_at, "finished_at": job.finished_at}


def lineage_dict(output: Output) -> dict[str, Any]:
    """Where an output came from: input, model and weights, seed, attempt, worker, timings."""
    return {
        "model": output.model_name, "model_version": output.model_version,
        # None: weights Loom does not hold (a remote endpoint; details say weights_verified)
        "weights_sha256": output.weights_sha256 or None, "seed": output.seed,
        "attempt": output.attempt, "worker_id": output.worker_id,
        "input_sha256": output.input_sha256, "timings": output.timings,
        "cached_from": output.cached_from, **({"details": output.details}
                                             if output.details else {}),
    }


def output_dict(output: Output) -> dict[str, Any]:
    return {
        "id": output.id, "kind": output.kind, "text": output.text,
        "storage_key": output.storage_key, "url": None,
        "content_type": output.content_type, "sha256": output.sha256,
        "size_bytes": output.size_bytes,
    }


def result_row(item: Item, output: Output | None) -> dict[str, Any]:
    """One item (an ORM object, or a plain row of ``iter_results`` with the same attributes)
    as every export and listing sees it: ``{"index", "item_id", "status",
    "metadata", "input", "output" | None, "error" | None, "lineage" | None, "attempts",
    "started_at", "finished_at"}``."""
    return {
        "index": item.index,
        "item_id": item.id,
        "status": item.status,
        "metadata": item.item_metadata,
        "input": item.input or {},
        "output": output_dict(output) if output is not None else None,
        "error": {"code": item.error_code, "message": item.error_message}
        if item.error_code else None,
        "lineage": lineage_dict(output) if output is not None else None,
        "attempts": item.attempts,
        "cached": output is not None and output.cached_from is not None,
        "started_at": item.started_at,
        "finished_at": item.finished_at,
    }
