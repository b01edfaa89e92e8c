"""The openai: backend's adaptive window (worker/openai_model.Window), as a pure unit: one more
request in flight per success up to the limit, halved on throttling, everyone held back until a
Retry-After has passed. (tests/api/test_openai_backend.py runs the backend against a real
server behind a fault proxy.)"""

from __future__ import annotations

import threading
import time

from worker.openai_model import Window, parse_ref


def test_additive_increase_multiplicative_decrease() -> None:
    w = Window(limit=8, start=2)
    for _ in range(10):
        w.acquire()
        w.release(ok=True)
    assert w.size == 8  # grew by one per success, capped at the limit
    w.acquire()
    w.release(ok=False, throttled=True)
    assert w.size == 4
    for _ in range(5):
        w.acquire()
        w.release(ok=False, throttled=True)
    assert w.size == 1  # never below one


def test_no_more_than_the_window_in_flight() -> None:
    w = Window(limit=3, start=3)
    peak = 0
    lock = threading.Lock()
    inside = 0

    def one() -> None:
        nonlocal peak, inside
        w.acquire()
        with lock:
            inside += 1
            peak = max(peak, inside)
        time.sleep(0.02)
        with lock:
            inside -= 1
        w.release(ok=False)

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak == 3


def test_retry_after_holds_everyone() -> None:
    w = Window(limit=4, start=4)
    w.acquire()
    w.release(ok=False, throttled=True, hold=0.3)
    t0 = time.monotonic()
    w.acquire()
    assert time.monotonic() - t0 >= 0.25
    w.release(ok=True)


def test_refs_name_a_served_model_and_a_base_url() -> None:
    assert parse_ref("openai:Qwen/Qwen2.5-VL-7B@http://h:8000/v1/") == (
        "Qwen/Qwen2.5-VL-7B", "http://h:8000/v1")
    assert parse_ref("openai:a@b@https://h/v1") == ("a@b", "https://h/v1")
