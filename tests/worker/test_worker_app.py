"""The Celery app's settings, the publisher, the thin task and the reconciler thread (no broker)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import pytest

from worker_helpers import ROOT, submit


def test_celery_settings_follow_the_item_lifecycle(make_settings: Any) -> None:
    from worker.app import QUEUE, make_celery

    settings = make_settings(visibility_timeout_seconds=7200, task_time_limit_seconds=3600,
                             broker_url="redis://example:6379/3")
    conf = make_celery(settings).conf
    assert conf.broker_url == "redis://example:6379/3"
    assert conf.task_acks_late is True and conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    # Model processes per invocation come from the host plan (worker.sizing) or the override.
    from worker import sizing

    plan = sizing.plan(device=settings.device)
    assert conf.worker_concurrency == plan.processes >= 1
    assert make_celery(make_settings(worker_processes=3)).conf.worker_concurrency == 3
    assert conf.task_ignore_result is True and not conf.result_backend
    # The visibility timeout in all three places the Celery Redis docs name.
    assert conf.broker_transport_options["visibility_timeout"] == 7200
    assert conf.result_backend_transport_options["visibility_timeout"] == 7200
    assert conf.visibility_timeout == 7200
    assert conf.task_soft_time_limit < conf.task_time_limit == 3600 < 7200
    assert conf.broker_connection_retry_on_startup is True
    assert conf.broker_connection_max_retries is None
    assert conf.task_routes["loom.*"]["queue"] == QUEUE == conf.task_default_queue == "loom"
    assert conf.worker_proc_alive_timeout >= 60  # model loading in worker_process_init


def test_visibility_timeout_must_exceed_the_hard_limit(make_settings: Any) -> None:
    with pytest.raises(ValueError):
        make_settings(visibility_timeout_seconds=600, task_time_limit_seconds=600)


def test_publish_chunk_sends_one_message_per_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    from loom.jobs import Chunk
    from worker import app as app_module

    sent: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(app_module.app, "send_task", lambda name, **kw: sent.append((name, kw)))
    app_module.publish_chunk(Chunk("job1", 64, 96, priority=5))
    app_module.publish_chunk(Chunk("job2", 0, 32))
    assert sent == [
        ("loom.run_chunk", {"args": ["job1", 64, 96], "queue": "loom", "priority": 4}),
        ("loom.run_chunk", {"args": ["job2", 0, 32], "queue": "loom", "priority": 9}),
    ]
    # Redis serves priority 0 first: more urgent jobs map lower, clamped to 0..9.
    assert [app_module.redis_priority(p) for p in (-3, 0, 1, 9, 50)] == [9, 9, 8, 0, 0]


def test_importing_the_app_loads_no_model_and_no_torch() -> None:
    code = (
        "import sys, worker.app, worker.tasks; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'pipeline')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_run_chunk_retries_on_infrastructure_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy.exc import OperationalError

    from worker import tasks

    calls: list[Any] = []

    class DownEngine:
        def run_chunk(self, chunk: Any) -> Any:
            calls.append(chunk)
            raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    from celery.exceptions import Retry

    monkeypatch.setattr(tasks._Process, "engine", DownEngine())
    monkeypatch.setattr(tasks._Process, "pid", os.getpid())
    with pytest.raises(Retry) as info:
        tasks.run_chunk.apply(args=["job", 0, 8], throw=True)
    assert info.value.when == 1  # 2 ** retries seconds, capped at 60
    assert isinstance(info.value.exc, OperationalError)
    assert calls[0].job_id == "job" and (calls[0].start, calls[0].end) == (0, 8)
    # An item-level problem never reaches the task: a non-infrastructure error is not retried.

    class BuggyEngine:
        def run_chunk(self, chunk: Any) -> Any:
            raise KeyError("bug")

    monkeypatch.setattr(tasks._Process, "engine", BuggyEngine())
    with pytest.raises(KeyError):
        tasks.run_chunk.apply(args=["job", 0, 8], throw=True)


def test_worker_ids_are_unique_per_process_start() -> None:
    from worker.tasks import worker_id

    a, b = worker_id(), worker_id()
    assert a != b and a.rsplit(":", 1)[0] == b.rsplit(":", 1)[0]
    node, pid, _ = worker_id("w1@gpu-7").split(":")
    assert node == "w1@gpu-7" and int(pid) > 0


def test_reconciler_thread_publishes_the_outbox_and_stops(embedded: Any) -> None:
    from worker.reconciler import Reconciler

    _, sf, store = embedded
    job_id = submit(sf, task="generate", inputs=[{"prompt": "p"}] * 20, chunk_size=8,
                    model="fake")  # committed, never published
    published: list[Any] = []
    rec = Reconciler(session_factory=sf, publish=published.append, interval_seconds=0.05,
                     stale_after_seconds=60, store=store)
    rec.start()
    try:
        deadline = time.monotonic() + 10
        while len(published) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        rec.stop()
    assert not rec.running
    assert sorted((c.job_id, c.start, c.end) for c in published) == [
        (job_id, 0, 8), (job_id, 8, 16), (job_id, 16, 20)
    ]
