"""The Celery app, built from Settings; torch-free so that the API can import it to publish.

``loom worker`` (``celery -A worker.app worker -Q loom -c P``) runs the model processes that fill
the host: one per GPU, or processes x torch threads = cores on CPU (worker.sizing). The model is loaded
in ``worker_process_init`` (see worker.tasks), i.e. after the fork, never at import.

Redis is only a delivery hint (ARCHITECTURE.md): a message may be lost, duplicated or delayed, and
the database's leases and fenced completion keep every item exactly-once. The settings below make
delivery at-least-once and keep a redelivery from racing a chunk that is still running.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery import Celery

from loom.config import Settings

if TYPE_CHECKING:  # pragma: no cover
    from loom.jobs import Chunk

QUEUE = "loom"
TASK_RUN_CHUNK = "loom.run_chunk"

# Redis priorities: kombu's Redis transport serves priority 0 first and 9 last. Loom jobs use
# "higher number = more urgent" (default 0), so a job's priority p maps to 9 - clamp(p, 0, 9).
REDIS_PRIORITY_STEPS = list(range(10))


def redis_priority(job_priority: int) -> int:
    return 9 - max(0, min(9, int(job_priority)))


def planned_processes(settings: Settings) -> int:
    from worker import sizing

    return sizing.plan(device=settings.device, processes=settings.worker_processes,
                       threads=settings.torch_threads).processes


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery settings that go with the item lifecycle (ARCHITECTURE.md)."""
    vt = int(settings.visibility_timeout_seconds)
    hard = int(settings.task_time_limit_seconds)
    # Both limits stay below the visibility timeout (Settings validates hard < vt), so Redis never
    # redelivers a chunk that a live worker is still allowed to run.
    soft = max(1, hard - max(1, min(300, hard // 10)))
    transport = {
        "visibility_timeout": vt,
        "priority_steps": REDIS_PRIORITY_STEPS,
        "sep": ":",
    }
    return {
        "broker_url": settings.broker_url,
        # State lives in the database; no result backend, results ignored.
        "result_backend": None,
        "task_ignore_result": True,
        "task_store_errors_even_if_ignored": False,
        # At-least-once: ack after the chunk ran; a worker that dies puts the message back.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Model processes per invocation: one per GPU, or processes x threads = cores on CPU
        # (worker.sizing); `loom worker` passes the same number as -c.
        "worker_concurrency": planned_processes(settings),
        # worker_process_init loads the model (torch import + weights): give it time to finish
        # before the parent gives up on the child (Celery's default is 4 s).
        "worker_proc_alive_timeout": 300.0,
        # The visibility timeout, set in all three places the Celery Redis docs require.
        "broker_transport_options": transport,
        "result_backend_transport_options": {"visibility_timeout": vt},
        "visibility_timeout": vt,
        "task_time_limit": hard,
        "task_soft_time_limit": soft,
        # Never give up on the broker: retry the connection forever, also at startup.
        "broker_connection_retry_on_startup": True,
        "broker_connection_retry": True,
        "broker_connection_max_retries": None,
        # A connection loss does not kill the running chunk: it finishes (its items are fenced by
        # their leases) and the redelivered message then finds nothing left to claim.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_default_queue": QUEUE,
        "task_routes": {"loom.*": {"queue": QUEUE}},
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "worker_send_task_events": True,  # chunk-level events for Flower (cheap: per chunk)
        "task_send_sent_event": False,
        "enable_utc": True,
        "timezone": "UTC",
    }


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured from ``settings``; the tasks module is imported by the worker."""
    celery_app = Celery("loom", include=["worker.tasks"])
    celery_app.conf.update(celery_config(settings))
    # The worker process builds its Engine from these (worker.tasks.get_settings).
    celery_app.loom_settings = settings  # type: ignore[attr-defined]
    return celery_app


def _publish(celery_app: Celery, chunk: "Chunk") -> None:
    celery_app.send_task(
        TASK_RUN_CHUNK,
        args=[chunk.job_id, chunk.start, chunk.end],
        queue=QUEUE,
        priority=redis_priority(getattr(chunk, "priority", 0) or 0),
    )


def make_publisher(celery_app: Celery) -> Any:
    """``publish(chunk)`` bound to ``celery_app``: what loom.jobs.publish_pending/reconcile call."""

    def publish(chunk: "Chunk") -> None:
        _publish(celery_app, chunk)

    return publish


# The app for the ``celery -A worker.app worker`` CLI and for the API's publisher.
app = make_celery(Settings())


def publish_chunk(chunk: "Chunk") -> None:
    """Send one chunk message ("work is waiting" for job_id items [start, end)) to queue "loom"."""
    _publish(app, chunk)
