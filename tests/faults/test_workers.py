"""Workers that die or stall: SIGKILL mid-chunk, SIGSTOP past the lease (its chunk runs past its
lease and the leases are taken over), and a shortened soak with kills aimed at busy workers."""

from __future__ import annotations

import random
import signal
import time

from sqlalchemy import select

from faults_checks import LEASE_SECONDS, Stack, check_invariants
from faults_services import Worker


def _busy_worker(stack: Stack, job_id: str) -> Worker | None:
    """The worker holding leases of the job right now (lease_owner starts with its node name)."""
    from loom.models import Item

    with stack.session_factory() as s:
        owners = set(s.scalars(select(Item.lease_owner).where(
            Item.job_id == job_id, Item.status == "running", Item.lease_owner.is_not(None))))
    for w in stack.workers:
        if any(o.startswith(f"{w.name}@") for o in owners):
            return w
    return None


def _wait_busy(stack: Stack, job_id: str, timeout: float = 60) -> Worker:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        w = _busy_worker(stack, job_id)
        if w is not None and w.alive:
            return w
        time.sleep(0.1)
    raise AssertionError(f"no worker picked up {job_id}\n{stack.logs()}")


def test_two_workers_sigkilled_mid_chunk(scenario: Stack) -> None:
    stack = scenario
    job_id = stack.caption_job(240)
    stack.wait_succeeded(job_id, 10)
    first = _wait_busy(stack, job_id)
    first.kill()
    time.sleep(3)
    second = next(w for w in stack.workers if w is not first)
    second.kill()
    stack.restart_worker(first)
    stack.restart_worker(second)
    counts = check_invariants(stack, job_id)
    assert counts == {"succeeded": 240}


def test_sigstopped_worker_past_its_lease_is_fenced(scenario: Stack) -> None:
    """A worker frozen mid-chunk for longer than its lease: the other worker takes the leases
    over; when the frozen one wakes up, its stale results are refused (one output per item)."""
    stack = scenario
    job_id = stack.caption_job(200)
    frozen = _wait_busy(stack, job_id)
    frozen.signal(signal.SIGSTOP)
    try:
        time.sleep(LEASE_SECONDS + 6)
    finally:
        frozen.signal(signal.SIGCONT)
    counts = check_invariants(stack, job_id)
    assert counts == {"succeeded": 200}


def test_short_soak_with_kills_aimed_at_busy_workers(scenario: Stack) -> None:
    """Two jobs at once for up to ~60 s, a busy worker SIGKILLed every 4-8 s and restarted."""
    stack = scenario
    rng = random.Random(13)
    jobs = [stack.caption_job(1500), stack.generate_job(1500)]
    deadline = time.monotonic() + 60
    first = _wait_busy(stack, jobs[1])  # the first kill as soon as a worker is busy
    first.kill()
    kills = 1
    time.sleep(1)
    stack.restart_worker(first)
    while time.monotonic() < deadline and any(
            stack.job_status(j) not in ("succeeded", "completed_with_errors", "failed")
            for j in jobs):
        victim = _busy_worker(stack, rng.choice(jobs))
        if victim is not None and victim.alive:
            victim.kill()
            kills += 1
            time.sleep(1)
            stack.restart_worker(victim)
        time.sleep(4 + rng.random() * 4)
    for j in jobs:
        counts = check_invariants(stack, j, allow_failed=True)
        failed = counts.get("failed", 0)
        # A kill costs the items in flight one attempt; 3 attempts and ~5 kills leave none dead.
        assert failed == 0, (counts, kills)
    assert kills >= 1
