"""A worker SIGKILLed in the middle of an OpenAI-compatible batch: the batch still completes
and its output file has every line exactly once, each caption right.

Its own module, so its own ``stack`` (PostgreSQL + Redis + S3 + the API + worker w1): w1 is
killed here, and w2 (started after the kill, same configuration) finishes the work once w1's
leases expire (20 s in the stack's workers)."""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from typing import Any

import pytest
from api_helpers import Stack, scenes
from fixtures_worker import WorkerProcess, loom_env
from sqlalchemy import func, select

openai = pytest.importorskip("openai")

CHAT = "/v1/chat/completions"
N = 1200  # caption lines: several seconds of one CPU worker, so it can be caught mid-batch


def worker_env(stack: Stack) -> dict[str, str]:
    """The environment of the stack's own worker (tests/api/conftest.py)."""
    s = stack.settings
    return loom_env(home=s.home, database_url=s.database_url, broker_url=s.broker_url,
                    storage_url=s.storage_url, s3_endpoint_url=s.s3_endpoint_url,
                    batch_size=s.batch_size, chunk_batches=s.chunk_batches,
                    retry_backoff_seconds=s.retry_backoff_seconds,
                    visibility_timeout_seconds=s.visibility_timeout_seconds,
                    task_time_limit_seconds=s.task_time_limit_seconds, device="cpu",
                    lease_seconds=20, heartbeat_seconds=2, reconcile_interval_seconds=1,
                    stale_chunk_seconds=10, fetch_timeout_seconds=3)


def running_items(stack: Stack, job_id: str) -> list[Any]:
    from loom.models import Item

    with stack.session_factory() as s:
        return list(s.scalars(select(Item).where(Item.job_id == job_id,
                                                 Item.status == "running")))


@pytest.mark.timeout(420)
def test_a_worker_killed_mid_batch_leaves_every_line_exactly_once(stack: Stack,
                                                                   tmp_path: Any) -> None:
    from loom.models import Event, Output

    oai = openai.OpenAI(base_url=f"{stack.url}/openai/v1", api_key=stack.keys["alpha"],
                        max_retries=0, timeout=120)
    from pipeline import data

    truth = [(png, data.caption(scene)) for png, scene in scenes(N, seed=77)]
    lines = [json.dumps({"custom_id": f"img-{i}", "method": "POST", "url": CHAT, "body": {
        "model": "loom-shapes", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {
                "url": "data:image/png;base64," + base64.b64encode(png).decode()}}]}]}})
        for i, (png, _) in enumerate(truth)]
    upload = oai.files.create(file=("in.jsonl", "\n".join(lines).encode()), purpose="batch")
    batch = oai.batches.create(input_file_id=upload.id, endpoint=CHAT, completion_window="24h")
    [job_id] = batch.model_extra["loom_job_ids"]

    # Catch w1 holding leases with part of the batch done: freeze its process group (so the
    # leases it holds cannot change), check, then SIGKILL it (Celery parent and pool child).
    w1 = stack.worker
    deadline = time.monotonic() + 120
    victim: list[Any] = []
    while not victim:
        assert time.monotonic() < deadline, w1.logs()
        assert oai.batches.retrieve(batch.id).status == "in_progress", "finished before a kill"
        running = running_items(stack, job_id)
        done = oai.batches.retrieve(batch.id).request_counts.completed
        if not running or done == 0:
            time.sleep(0.02)
            continue
        os.killpg(w1.proc.pid, signal.SIGSTOP)
        time.sleep(0.5)  # a commit already on the wire lands
        victim = running_items(stack, job_id)
        if not victim:
            os.killpg(w1.proc.pid, signal.SIGCONT)
    assert {os.getpgid(int(it.lease_owner.split(":")[1])) for it in victim} == {w1.proc.pid}
    os.killpg(w1.proc.pid, signal.SIGKILL)
    t_kill = time.monotonic()

    w2 = WorkerProcess(worker_env(stack), tmp_path / "w2.log", name="w2")
    try:
        while (done := oai.batches.retrieve(batch.id)).status != "completed":
            assert done.status in ("in_progress", "finalizing"), done
            assert time.monotonic() - t_kill < 240, w2.logs()
            time.sleep(0.5)
    finally:
        w2.stop()
    print(f"\n[openai batch] {len(victim)} items leased at the kill; batch completed "
          f"{time.monotonic() - t_kill:.1f} s later")

    assert done.error_file_id is None
    assert (done.request_counts.total, done.request_counts.completed) == (N, N)
    out = [json.loads(line) for line in oai.files.content(done.output_file_id).text.splitlines()]
    assert len(out) == N and [o["custom_id"] for o in out] == [f"img-{i}" for i in range(N)]
    captions = [o["response"]["body"]["choices"][0]["message"]["content"] for o in out]
    assert captions == [c for _, c in truth]
    with stack.session_factory() as s:
        per_item = list(s.execute(select(Output.item_id, func.count()).where(
            Output.job_id == job_id).group_by(Output.item_id)))
        expired = s.scalar(select(func.count()).select_from(Event).where(
            Event.job_id == job_id, Event.kind == "lease_expired"))
    assert len(per_item) == N and {n for _, n in per_item} == {1}  # one output per item
    assert expired >= len(victim)  # the killed worker's leases expired and were run again
